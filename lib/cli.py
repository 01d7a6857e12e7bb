"""What every script shares: the parser, argument types, run flags, one-line errors, and the
output-folder rule. Torch-free, as predict.py imports it: the data and training flags are in
lib/flags (the training flags' choices come from modules that import torch).

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


def data_name(data, task):
    """--data (one or a list) and --task as the first line of a run names them (ImageFolder data has no task)."""
    data = " + ".join(map(str, data)) if isinstance(data, (list, tuple)) else str(data)
    return f"{data}, task {task}" if task else data


def add_max_pixels_arg(group, default, more_help=""):
    group.add_argument("--max-image-pixels", type=non_negative_int, default=default, metavar="N",
                       help="refuse (or with --skip-bad-images skip) images of more than N pixels, which "
                            "may be decompression bombs (Pillow's limit); 0 allows any size" + more_help)


def load_options(args):
    """load_split's keyword arguments from the data flags (lib.flags.add_data_args)."""
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
