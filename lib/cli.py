"""What every script shares: flag definitions, one-line errors, and the output-folder rule.

Output rule, the same for every script: an output that already exists is refused unless
--overwrite is given (train.py and transfer.py also accept --resume to continue a run).
"""
import argparse
import math
import os
import sys
from pathlib import Path

from lib.errors import UserError
from lib.files import DISK_FULL, failure_reason, remove_stale_temporaries
from lib.images import DEFAULT_MAX_PIXELS
from lib.preprocessing import DEFAULT_IMAGE_SIZE, DEFAULT_RESIZE, RESIZE_POLICIES


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (`prog: error: ...`) and exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option; the epilog keeps its own line breaks (a table)."""


def make_parser(doc, epilog=None):
    return Parser(description=doc.strip().splitlines()[0] if doc else None, epilog=epilog,
                  formatter_class=HelpFormatter)


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_int_or_none(text):
    """A positive integer, or `none` (any case) for None: a limit that is off."""
    if text.strip().lower() == "none":
        return None
    try:
        return positive_int(text)
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"must be a positive integer or none, got {text}") from None


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def finite_float(text):
    """A number; nan and inf are refused (a nan --mean or an inf --std would make every input nan or 0)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def non_negative_float(text):
    value = finite_float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def positive_float(text):
    value = finite_float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def unit_interval(text):
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


class OneOrMore(argparse.Action):
    """nargs="+" that keeps one value as it is (a str, as every reader of a checkpoint's args expects)
    and several as a list."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values[0] if len(values) == 1 else list(values))


def probability(text):
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def add_data_args(parser, image_size=True, data_required=True, size_from_weights=False, several=False):
    """image_size=False for scripts that take the image size (and resize policy) from a checkpoint;
    data_required=False for scripts that can read image files instead; size_from_weights: the
    --image-size default is None, for the script to choose (train.py: published weights' size);
    several=True for scripts that train on several datasets at once (args.data is then a list:
    lib.data.load_datasets)."""
    group = parser.add_argument_group("data")
    if several:
        group.add_argument("--data", required=data_required, nargs="+", action=OneOrMore, metavar="DIR",
                           help="dataset folder(s) (CSV or ImageFolder layout), or 'demo' for the built-in "
                                "synthetic set; several are combined: the same split of each, classes matched "
                                "by name in the first one's order, each decoded at the same size")
    else:
        group.add_argument("--data", required=data_required,
                           help="dataset folder (CSV or ImageFolder layout), or 'demo' for the built-in synthetic set")
    group.add_argument("--task", choices=["source", "target"],
                       help="which task's rows to use (needed for the CSV layout, unused for ImageFolder)")
    if image_size:
        group.add_argument("--image-size", type=positive_int,
                           default=None if size_from_weights else DEFAULT_IMAGE_SIZE,
                           help="images of another size are resized to this square size"
                                + (f" (None: {DEFAULT_IMAGE_SIZE}, or the resolution published --weights "
                                   "were trained at)" if size_from_weights else ""))
        group.add_argument("--resize", choices=RESIZE_POLICIES, default=DEFAULT_RESIZE,
                           help="how a photo that is not square becomes one: squash (resize, aspect ignored), "
                                "crop (centre crop of the short side) or pad (letterbox, black bars); kept in "
                                "the checkpoint and the ONNX model, so every later step does the same")
    add_loading_args(group)
    return group


def add_loading_args(group, from_checkpoint=False):
    """How images are read (load_options): --skip-bad-images, --max-image-pixels, --pixel-cache,
    --no-pixel-cache. from_checkpoint (export.py, which reads the images a checkpoint's run read):
    images are skipped too when that run skipped them, and --max-image-pixels defaults (None) to its."""
    group.add_argument("--skip-bad-images", action="store_true",
                       help="warn about and skip unreadable images instead of stopping"
                            + ("; on too when the checkpoint's run skipped them" if from_checkpoint else ""))
    add_max_pixels_arg(group, None if from_checkpoint else DEFAULT_MAX_PIXELS,
                       "; None: the checkpoint's run's" if from_checkpoint else "")
    group.add_argument("--pixel-cache", metavar="DIR",
                       help="folder of decoded pixels, decoded once and memory-mapped by every later run "
                            "(None: $XDG_CACHE_HOME/landmark-classification/pixels; ~/.cache/... without "
                            "XDG_CACHE_HOME; a folder in $TMPDIR, with a warning, without a home folder)")
    group.add_argument("--no-pixel-cache", action="store_true",
                       help="decode every time and keep nothing (decoding goes to a temporary file in $TMPDIR)")


def data_name(data, task):
    """--data (one or a list) and --task as the first line of a run names them (ImageFolder data has no task)."""
    data = " + ".join(map(str, data)) if isinstance(data, (list, tuple)) else str(data)
    return f"{data}, task {task}" if task else data


def add_max_pixels_arg(group, default, more_help=""):
    group.add_argument("--max-image-pixels", type=non_negative_int, default=default, metavar="N",
                       help="refuse (or with --skip-bad-images skip) images of more than N pixels, which "
                            "may be decompression bombs (Pillow's limit); 0 allows any size" + more_help)


def load_options(args):
    """load_split's keyword arguments from the data flags (add_data_args)."""
    from lib.pixel_cache import DEFAULT  # not at the top: predict.py needs neither it nor tqdm

    return {"skip_bad_images": args.skip_bad_images, "max_pixels": args.max_image_pixels,
            "cache_dir": None if args.no_pixel_cache else args.pixel_cache or DEFAULT}


def add_run_args(parser, out_help, seed_help="seed for weights, shuffling and augmentation"):
    group = parser.add_argument_group("run")
    group.add_argument("--out", required=True, help=out_help)
    group.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    group.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                       help="auto picks CUDA when available")
    group.add_argument("--seed", type=int, default=0, help=seed_help)
    return group


def add_training_args(parser, defaults):
    """Training flags of train.py and transfer.py; defaults come from the recipe (TrainConfig)."""
    from lib.augment import PRESETS  # torch-free callers (predict.py) never reach this
    from lib.balance import CLASS_WEIGHTS, SAMPLERS

    group = parser.add_argument_group("training (defaults are the recommended recipe)")
    group.add_argument("--epochs", type=positive_int, default=defaults.epochs)
    group.add_argument("--min-steps", type=non_negative_int, default=defaults.min_steps, metavar="N",
                       help="at least this many optimizer updates: an epoch goes over a small train split "
                            "several times (passes) so that --epochs epochs make N; 0: one pass an epoch")
    group.add_argument("--batch-size", type=positive_int, default=defaults.batch_size)
    group.add_argument("--optimizer", choices=["adam", "adamw", "sgd"], default=defaults.optimizer)
    group.add_argument("--lr", type=positive_float, default=defaults.lr, help="learning rate")
    group.add_argument("--weight-decay", type=non_negative_float, default=defaults.weight_decay)
    group.add_argument("--scheduler", choices=["step", "cosine", "linear", "onecycle", "none"], default=defaults.scheduler,
                       help="learning-rate schedule over the epochs (updated every step); onecycle is "
                            "torch's OneCycleLR (30%% rising from lr/25, then down), with its own warm-up")
    group.add_argument("--warmup-epochs", type=non_negative_float, default=defaults.warmup_epochs,
                       help="ramp the learning rate up linearly over this many epochs first (not with "
                            "--scheduler onecycle, which warms up on its own)")
    group.add_argument("--step-size", type=positive_int, default=defaults.step_size,
                       help="with --scheduler step: epochs between decays")
    group.add_argument("--gamma", type=positive_float, default=defaults.gamma,
                       help="with --scheduler step: decay factor")
    group.add_argument("--label-smoothing", type=non_negative_float, default=defaults.label_smoothing)
    group.add_argument("--augment", choices=list(PRESETS), default=defaults.augment,
                       help="augmentation preset, from none to strong")
    group.add_argument("--mixup", type=non_negative_float, default=defaults.mixup, metavar="ALPHA",
                       help="MixUp after the augmentation: blend each batch's images and labels pairwise by "
                            "lambda ~ Beta(ALPHA, ALPHA) (torchvision's v2.MixUp; 0.2 is common); 0 turns it off")
    group.add_argument("--cutmix", type=non_negative_float, default=defaults.cutmix, metavar="ALPHA",
                       help="CutMix: paste a box of another image of the batch, labels mixed by area (v2.CutMix; "
                            "1.0 is common); 0 turns it off; with --mixup too, each batch gets one of the two")
    group.add_argument("--class-weights", choices=list(CLASS_WEIGHTS), default=defaults.class_weights,
                       help="balanced: weigh each image in the loss by n / (classes x its class's count) on the "
                            "train split (scikit-learn's 'balanced'), so every class counts alike")
    group.add_argument("--sampler", choices=list(SAMPLERS), default=defaults.sampler,
                       help="shuffle: every image once per epoch; balanced: as many images drawn with probability "
                            "inverse to their class's count (rare ones repeat), so classes come equally often")
    group.add_argument("--unlabelled", metavar="DIR_OR_challenge",
                       help="also learn from unlabelled photos (FixMatch: a confident prediction on a lightly "
                            "augmented view is the label a strongly augmented view learns): 'challenge' for that "
                            "partition of --data, or a folder of photos (subfolders included); None: off")
    group.add_argument("--unlabelled-weight", type=non_negative_float, default=defaults.unlabelled_weight,
                       help="with --unlabelled: weight of the unlabelled photos' loss beside the labelled one")
    group.add_argument("--threshold", type=probability, default=defaults.threshold,
                       help="with --unlabelled: the top probability a prediction needs to become a pseudo-label")
    group.add_argument("--patience", type=positive_int_or_none, default=defaults.patience, metavar="N|none",
                       help="stop after this many epochs without a better validation score, once the learning "
                            "rate is down to a quarter of its peak (or falls no further); none: never stop early, "
                            "run every epoch")
    group.add_argument("--ema", type=unit_interval, default=defaults.ema,
                       help="decay of an exponential moving average of the weights, updated every step "
                            "(bias-corrected: no warm-up needed), which is what is validated and saved; 0 turns it off")
    group.add_argument("--ema-bn-images", type=non_negative_int, default=defaults.ema_bn_images, metavar="N",
                       help="with --ema: before each validation the average's BatchNorm statistics are recomputed "
                            "on this many training images, unaugmented (averaged statistics do not fit averaged "
                            "weights); 0 averages them with the weights, as versions before did (BatchNorm models "
                            "such as MobileNetV3 then validate at chance in short runs)")
    group.add_argument("--select", choices=["best", "last"], default=defaults.select,
                       help="which epoch OUT/model.pt holds: the best by --select-metric (best.pt's), or the last")
    group.add_argument("--select-metric", choices=["accuracy", "balanced_accuracy", "auroc", "loss"],
                       default=defaults.select_metric,
                       help="the val metric that ranks epochs for best.pt, --select best and early stopping; "
                            "balanced_accuracy (mean recall over classes) weighs every class alike and equals "
                            "accuracy on a balanced val split")
    group.add_argument("--eval-every", type=positive_int, default=defaults.eval_every,
                       help="validate every this many epochs (and after the last one)")
    group.add_argument("--min-size", type=non_negative_int, default=defaults.min_size,
                       help="progressive resizing: the first epochs train on images this small, growing "
                            "to the full size by three quarters of the epochs; 0 turns it off")
    group.add_argument("--amp", choices=["auto", "on", "off"], default="auto",
                       help="mixed precision for training (bfloat16 on CPU, float16 on CUDA; validation is always "
                            "float32); auto: on where the "
                            "hardware has fast support (CUDA, CPUs with AMX or AVX512-BF16)")
    group.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the training step (a minute or more of compiling first)")
    group.add_argument("--sync-bn", action="store_true", help="synchronise BatchNorm across torchrun processes")
    group.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    return group


# What a training run writes into its folder (fit's checkpoints and metrics, the scripts' curves).
RUN_OUTPUTS = ("model.pt", "best.pt", "last.pt", "metrics.csv", "curves.png")


def prepare_out_dir(out, outputs, overwrite=False, resume=False):
    """Create the output folder; refuse one that holds any of `outputs` (names or glob patterns
    of what this run writes there) unless told what to do. Temporary files that a killed write
    left in it are removed. Raises UserError for a folder that cannot be created."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    if resume:
        if not (out / "last.pt").is_file():
            raise UserError(f"--resume: no {out / 'last.pt'} to resume from")
    else:
        existing = existing_outputs(out, outputs)
        if existing and not overwrite:
            raise UserError(f"--out {out}: already holds {', '.join(existing)}; "
                            "use --resume to continue or --overwrite to replace it")
        make_folder(out, "--out")
    if not os.access(out, os.W_OK | os.X_OK):  # now, not after an epoch of training
        raise UserError(f"--out {out}: no permission to write in this folder")
    removed = remove_stale_temporaries(out)
    if removed:
        print(f"removed {len(removed)} temporary file(s) an interrupted write left in {out}: {', '.join(removed)}")
    return out


def existing_outputs(out, outputs):
    """The names in folder `out` that match any of `outputs` (names or glob patterns), sorted."""
    if not Path(out).is_dir():
        return []
    return sorted({path.name for pattern in outputs for path in Path(out).glob(pattern)})


def make_folder(folder, flag):
    """mkdir -p, with the reason it cannot be made (a path through a file, no permission, a full
    disk) as a UserError naming `flag`."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        blocker = next((p for p in folder.parents if p.exists() and not p.is_dir()), None)
        reason = f"{blocker} is a file, not a folder" if blocker else error.strerror or str(error)
        raise UserError(f"{flag} {folder}: cannot create this folder ({reason})") from None


def plain_args(args):
    """Parsed arguments as a dict of plain values, to store in a checkpoint."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def run(main, parser):
    """Parse, run, and turn a UserError (or the OSError of a full disk) into `prog: error: message`
    with exit code 2. A main that returns a number exits with it (export.py's 3: written, but not everything)."""
    args = parser.parse_args()
    try:
        status = main(args)
    except UserError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:
        # Writes that bypass atomic_write (a library's own files, the pixel cache) on a full disk.
        if error.errno not in DISK_FULL:
            raise
        where = f"{error.filename}: " if error.filename else ""
        print(f"{parser.prog}: error: {where}{failure_reason(error)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    if status:
        sys.exit(status)
