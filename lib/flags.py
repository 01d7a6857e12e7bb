"""The data and training flags (train.py, transfer.py, crossval.py, evaluate.py, explain.py,
export.py): apart from lib/cli, which predict.py imports and which never reaches torch, because
the training flags' choices come from modules that do (augmentation presets, samplers).
"""
from lib.cli import (OneOrMore, add_max_pixels_arg, non_negative_float, non_negative_int, positive_float,
                     positive_int, positive_int_or_none, probability, unit_interval)
from lib.images import DEFAULT_MAX_PIXELS
from lib.preprocessing import DEFAULT_IMAGE_SIZE, DEFAULT_RESIZE, RESIZE_POLICIES


def add_data_args(parser, image_size=True, data_required=True, size_chosen=False, several=False):
    """image_size=False for scripts that take the image size (and resize policy) from a checkpoint;
    data_required=False for scripts that can read image files instead; size_chosen: the
    --image-size default is None, for the script to choose (train.py: published weights' size, else
    from the training photos, lib.weights.image_size_for);
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
                           default=None if size_chosen else DEFAULT_IMAGE_SIZE,
                           help="images of another size are resized to this square size"
                                + (" (None: the resolution published --weights were trained at, else 128 "
                                   "for photos whose median short side is at least 128 px, else 64)"
                                   if size_chosen else ""))
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


def add_training_args(parser, defaults):
    """Training flags of train.py and transfer.py; defaults: a recipe (lib.recipe.RECIPES)."""
    from lib.augment import PRESETS  # not at the top: they import torch, which the data flags' users need not
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
    group.add_argument("--teacher", metavar="CKPT",
                       help="distil a teacher: a checkpoint of the same classes (typically an ensemble, from "
                            "ensemble.py or transfer.py --seeds) whose probabilities on each augmented batch "
                            "become the targets; None: off")
    group.add_argument("--teacher-weight", type=probability, default=defaults.teacher_weight,
                       help="with --teacher: its share of each target (the label has the rest)")
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
