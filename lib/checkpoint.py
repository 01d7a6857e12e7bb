"""Self-describing checkpoints: written atomically, read back without unpickling code.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
torch.load(path, weights_only=True): a file that would run code on load is refused.
Keys: format, model, stem, classes, image_size, resize, mean, std (read_preprocessing gives them
as one record, lib.preprocessing.Preprocessing, filling in what older checkpoints lack), args,
epoch, metrics, state_dict; lineage: the datasets trained on
(data_lineage), and for transferred models the source (lib.transfer), for those started from a
weights file the file (lib.weights);
selection in OUT/model.pt (which rule chose it); ensemble in an ensemble checkpoint (lib.ensemble:
its state_dict holds every member's weights). OUT/last.pt adds history and `training`, the
state a resumed run continues from (training_state / restore_training_state).

FORMAT changes when the contents do. Format 1 (before the `training` entry, with the older
scheduler and weight average) still loads for evaluation, explanation, export and transfer;
only --resume needs the current format.
"""
import hashlib
import pickle
import zipfile
from dataclasses import asdict
from pathlib import Path

import torch

from lib.demo import demo_root
from lib.errors import UserError
from lib.files import atomic_write
from lib.images import DEFAULT_MAX_PIXELS
from lib.models import MODELS, Ensemble, build_model, resolve_stem, stems_of
from lib.preprocessing import DEFAULT_RESIZE, Preprocessing, check_resize
from lib.recipe import RECIPES

FORMAT = "landmark-classification/2"
READABLE = (FORMAT, "landmark-classification/1")
REQUIRED = ("format", "model", "classes", "image_size", "mean", "std", "state_dict")
# What only a resumed run needs; OUT/model.pt and best.pt leave it out.
TRAINING_KEYS = ("history", "training")


def save_checkpoint(checkpoint, path):
    atomic_write(path, lambda tmp: _save(checkpoint, tmp))


def _save(checkpoint, tmp):
    # Through a Python file, so that a failed write (a full disk) is an OSError, which atomic_write
    # reports in one line: torch.save to a path reports it as an opaque RuntimeError, and closing
    # its zip writer after a failed write hides the OSError behind another RuntimeError.
    with open(tmp, "wb") as f:
        try:
            torch.save(checkpoint, f)
        except RuntimeError as error:
            if isinstance(error.__context__, OSError):
                raise error.__context__ from None
            raise


def load_checkpoint(path):
    """Load and check a checkpoint; any problem is a UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else "refused"
        raise UserError(f"checkpoint {path}: refused, it is not a plain checkpoint "
                        f"(weights_only load failed: {first})") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, LookupError) as error:
        raise UserError(f"checkpoint {path}: not a readable checkpoint (truncated or another "
                        f"format: {str(error).splitlines()[0] if str(error) else type(error).__name__})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") not in READABLE:
        raise UserError(f"checkpoint {path}: not a {FORMAT} checkpoint")
    missing = [k for k in REQUIRED if k not in checkpoint]
    if missing:
        raise UserError(f"checkpoint {path}: missing {', '.join(missing)}")
    return checkpoint


def file_hash(path):
    """sha256 of a file, to record which checkpoint a later artefact came from."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_preprocessing(checkpoint, where="checkpoint"):
    """The checkpoint's Preprocessing record (lib.preprocessing), the one reading of these entries:
    what older checkpoints lack is filled in as they were made (before --resize they squashed;
    before the stem entry, see _network). A model this project does not build, or a stem or
    resize policy it does not know, is a UserError naming `where`."""
    name, stem = _network(checkpoint, where)
    return Preprocessing(image_size=checkpoint["image_size"],
                         resize=check_resize(checkpoint.get("resize", DEFAULT_RESIZE), where=f"{where}: resize"),
                         mean=tuple(float(v) for v in checkpoint["mean"]),
                         std=tuple(float(v) for v in checkpoint["std"]),
                         classes=tuple(checkpoint["classes"]), model=name, stem=stem)


def _network(checkpoint, where):
    """(model, stem) of a checkpoint, checked; a checkpoint from before the stem entry was built
    by lib.models.resolve_stem's rule, which gives its stem."""
    name = checkpoint["model"]
    if name not in MODELS:
        raise UserError(f"{where}: model {name!r} is not one this project builds")
    stem = checkpoint.get("stem")
    if stem not in (None, *stems_of(name)):
        raise UserError(f"{where}: weights do not fit model {name!r} (its stem {stem!r} is none "
                        f"of {', '.join(stems_of(name))})")
    return name, resolve_stem(name, checkpoint["image_size"], stem)


def build_from_checkpoint(checkpoint, where="checkpoint", load_weights=True):
    """The network a checkpoint describes (model, stem, classes, image size) in eval mode, with its
    weights; load_weights=False gives a fresh initialisation of the same network (Grad-CAM's
    sanity check). Every rebuild goes through here, so none can forget a part of the description.
    An ensemble checkpoint (lib.ensemble) gives a lib.models.Ensemble of its members."""
    name, stem = _network(checkpoint, where)

    def network():
        return build_model(name, len(checkpoint["classes"]), checkpoint["image_size"], stem)
    if "ensemble" in checkpoint:
        members = checkpoint["ensemble"].get("members") if isinstance(checkpoint["ensemble"], dict) else None
        if not isinstance(members, list) or not members:
            raise UserError(f"{where}: its ensemble entry lists no members")
        model = Ensemble([network() for _ in members])
    else:
        model = network()
    if load_weights:
        try:
            model.load_state_dict(checkpoint["state_dict"])
        except RuntimeError as error:
            raise UserError(f"{where}: weights do not fit model {name!r} ({_state_dict_mismatch(error)})") from None
    return model.eval()


def _state_dict_mismatch(error, limit=300):
    """load_state_dict's RuntimeError in one line: its reasons, which name the tensors (its first
    line, "Error(s) in loading state_dict for ...", names none), cut at `limit` characters."""
    reasons = "; ".join(line.strip() for line in str(error).splitlines()[1:] if line.strip()) or str(error)
    return reasons if len(reasons) <= limit else reasons[:limit] + "..."


def data_location(data):
    """--data as a comparable value: the folder's resolved real path, the demo dataset's folder for
    'demo' (however --data was written, the same folder is the same value); None for None; several
    datasets (a list) as a list of those (one dataset in a list is that dataset)."""
    if isinstance(data, (list, tuple)):
        return data_location(data[0]) if len(data) == 1 else [data_location(part) for part in data]
    if data is None:
        return None
    return str(Path(demo_root() if str(data) == "demo" else data).resolve())


def data_lineage(data):
    """The lineage entry of the data a run trained on: {"data": [each dataset's data_location]}."""
    locations = data_location(data)
    return {"data": locations if isinstance(locations, list) else [locations]}


def training_state(model, ema, optimizer, scheduler, scaler, selector, best_val_probs):
    """Everything a resumed run continues from, beyond the validated weights (last.pt's `training`)."""
    return {"raw_state_dict": model.state_dict(), "ema": ema.state_dict() if ema else None,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "selector": selector.state_dict(),
            "best_val_probs": best_val_probs, "rng": _rng_state(_device_of(model))}


def _device_of(model):
    return next(model.parameters()).device


def _rng_state(device):
    """torch's global generators that training draws from (dropout, stochastic depth): the CPU's,
    and on CUDA the device's, which is another generator."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _restore_rng(rng, device):
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda" and rng.get("cuda") is not None:  # a run that trained on CUDA before
        torch.cuda.set_rng_state(rng["cuda"], device)


def restore_training_state(saved, path, model, ema, optimizer, scheduler, scaler, selector):
    """Put last.pt's training state back; returns the best epoch's val probabilities.

    A last.pt of format 1 (older scheduler, no `training` entry) is refused in one line: it
    still evaluates and transfers, but cannot continue.
    """
    if saved.get("format") != FORMAT or "training" not in saved:
        raise UserError(f"--resume: {path} was written by an earlier version ({saved.get('format')}); it still "
                        f"evaluates and transfers, but cannot be resumed: start a new --out")
    state = saved["training"]
    model.load_state_dict(state["raw_state_dict"])
    if ema:
        ema.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state["scaler"]:  # empty when saved by a disabled (non-CUDA or non-AMP) scaler
        scaler.load_state_dict(state["scaler"])
    selector.load_state_dict(state["selector"])
    _restore_rng(state["rng"], _device_of(model))
    return state["best_val_probs"]


def without_training_state(checkpoint):
    """A checkpoint as OUT/model.pt holds it: the weights and their description, no resume state."""
    return {k: v for k, v in checkpoint.items() if k not in TRAINING_KEYS}


# Flags a resumed run may change: where and how fast it runs, how it is watched, which epoch it
# ships and how pixels are stored; none changes the weights an epoch trains to (--amp changes the
# rounding only, so a run can move to a machine with or without bfloat16). Every other flag of
# the run's args is compared, so a flag added later is checked without being listed anywhere.
FREE_ON_RESUME = frozenset({"out", "overwrite", "resume", "device", "amp", "channels_last", "compile", "sync_bn",
                            "patience", "eval_every", "select", "pixel_cache", "no_pixel_cache", "seeds"})
# Flags compared by what they resolve to, not as typed: the folder, not how its path is written;
# the file's contents, not its path; the stem `auto` chose; for a transferred run, what its
# --source checkpoint fixes (model, size, ...) is in its description, not its args. Every run that
# can resume (format 2) recorded its stem and resize policy, so they are compared as recorded.
_RESOLVED = {
    "model": lambda run: run.get("model"),
    "stem": lambda run: run.get("stem"),
    "image_size": lambda run: run.get("image_size"),
    "resize": lambda run: run.get("resize"),
    "task": lambda run: run.get("task"),
    "data": lambda run: data_location((run.get("args") or {}).get("data")),
    "source": lambda run: (run.get("lineage") or {}).get("source_sha256"),
    "freeze": lambda run: (run.get("lineage") or {}).get("frozen_stages"),
    "weights": lambda run: (run.get("lineage") or {}).get("weights_sha256"),
}
# How the old value is shown where the compared value is not what the user typed.
_SHOWN = {"data": lambda run: (run.get("args") or {}).get("data"),
          "source": lambda run: (run.get("lineage") or {}).get("source"),
          "weights": lambda run: (run.get("lineage") or {}).get("weights")}
# A transferred run takes these from its --source checkpoint: there they are --source's to answer for.
FROM_SOURCE = {"model": "source", "stem": "source", "image_size": "source", "resize": "source", "weights": "source"}
_UNRECORDED = object()


def _legacy_defaults():
    """What a run from before a flag existed ran with: the flag's default (every flag added since
    format 2 defaults to what runs did before it). A flag missing here and from an older run's
    args is unknown there, and differs from any value."""
    return {**asdict(RECIPES["train"]), "max_image_pixels": DEFAULT_MAX_PIXELS, "mean": None, "std": None,
            "unlabelled": None, "teacher": None,
            # Runs from before these flags had no step floor and averaged BatchNorm statistics.
            "min_steps": 0, "ema_bn_images": 0}


def _flag(key):
    return "--" + key.replace("_", "-")


def _value(run, key, legacy):
    if key in _RESOLVED:
        return _RESOLVED[key](run)
    args = run.get("args") or {}
    return args[key] if key in args else legacy.get(key, _UNRECORDED)


def _compared_keys(saved, describe):
    """The settings of either run that shape what is trained: every arg but FREE_ON_RESUME, in order."""
    keys = [*_RESOLVED, *(saved.get("args") or {}), *(describe.get("args") or {})]
    return [key for key in dict.fromkeys(keys) if key not in FREE_ON_RESUME]


def _differing(saved, describe):
    legacy = _legacy_defaults()
    return [key for key in _compared_keys(saved, describe)
            if _value(saved, key, legacy) != _value(describe, key, legacy)]


def resume_mismatches(saved, describe):
    """The flags whose values differ between the run in `saved` (last.pt) and this command line.

    describe is the new run's checkpoint description (with its args)."""
    transferred = "source" in (describe.get("lineage") or {})
    keys = [FROM_SOURCE.get(key, key) if transferred else key for key in _differing(saved, describe)]
    flags = [_flag(key) for key in dict.fromkeys(keys)]
    # Nothing the user set differs, yet the training split has other classes or other statistics
    # (its mean and std when --mean/--std were not given): the data changed under the run.
    if not flags and (list(saved.get("classes", [])) != list(describe["classes"])
                      or _statistics(saved) != _statistics(describe)):
        flags.append("--data")
    return flags


def _statistics(run):
    """The normalisation a run trained with, as comparable lists of floats (None where not recorded)."""
    return [None if run.get(key) is None else [float(v) for v in run[key]] for key in ("mean", "std")]


def _shown(run, flag):
    """`--flag value` as the run had it: lists as values in a row, on/off flags by name, a flag
    left at None (e.g. --mean: the training split's) as `no --flag`."""
    key = flag[2:].replace("-", "_")
    value = _SHOWN[key](run) if key in _SHOWN else _value(run, key, _legacy_defaults())
    if value is _UNRECORDED:
        return f"{flag} (not recorded)"
    if value is None or value is False:
        return f"no {flag}"
    if value is True:
        return flag
    if isinstance(value, (list, tuple)):
        return f"{flag} {' '.join(map(str, value))}"
    return f"{flag} {value}"


def check_resume(saved, describe, path):
    """Refuse to continue a run under different settings, in one line naming the flags."""
    flags = resume_mismatches(saved, describe)
    if flags:
        had = ", ".join(_shown(saved, flag) for flag in flags)
        raise UserError(f"--resume: {path} belongs to a run with different {', '.join(flags)} "
                        f"(it had {had}); resume with the same settings, or start a new --out")
