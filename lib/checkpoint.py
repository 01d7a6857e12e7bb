"""Self-describing checkpoints: written atomically, read back without unpickling code.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
torch.load(path, weights_only=True): a file that would run code on load is refused.
Keys: format, model, stem (older checkpoints lack it: lib.models.resolve_stem), classes,
image_size, mean, std, args, epoch, metrics, state_dict; lineage: the datasets trained on
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
from pathlib import Path

import torch

from lib.errors import UserError
from lib.files import atomic_write
from lib.models import MODELS, Ensemble, build_model, stems_of

FORMAT = "landmark-classification/2"
READABLE = (FORMAT, "landmark-classification/1")
REQUIRED = ("format", "model", "classes", "image_size", "mean", "std", "state_dict")
# What only a resumed run needs; OUT/model.pt and best.pt leave it out.
TRAINING_KEYS = ("history", "training")


def save_checkpoint(checkpoint, path):
    atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


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


def build_from_checkpoint(checkpoint, where="checkpoint", load_weights=True):
    """The network a checkpoint describes (model, stem, classes, image size) in eval mode, with its
    weights; load_weights=False gives a fresh initialisation of the same network (Grad-CAM's
    sanity check). Every rebuild goes through here, so none can forget a part of the description.
    An ensemble checkpoint (lib.ensemble) gives a lib.models.Ensemble of its members."""
    name = checkpoint["model"]
    if name not in MODELS:
        raise UserError(f"{where}: model {name!r} is not one this project builds")
    stem = checkpoint.get("stem")
    if stem not in (None, *stems_of(name)):
        raise UserError(f"{where}: weights do not fit model {name!r} (its stem {stem!r} is none "
                        f"of {', '.join(stems_of(name))})")

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
            raise UserError(f"{where}: weights do not fit model {name!r} "
                            f"({str(error).splitlines()[0]})") from None
    return model.eval()


def data_location(data):
    """--data as a comparable value: 'demo', or the folder's resolved path; several datasets (a list)
    as a list of those (one dataset in a list is that dataset)."""
    if isinstance(data, (list, tuple)):
        return data_location(data[0]) if len(data) == 1 else [data_location(part) for part in data]
    return data if data in (None, "demo") else str(Path(data).resolve())


def data_lineage(data):
    """The lineage entry of the data a run trained on: {"data": [each dataset's data_location]}."""
    locations = data_location(data)
    return {"data": locations if isinstance(locations, list) else [locations]}


def training_state(model, ema, optimizer, scheduler, scaler, selector, best_val_probs):
    """Everything a resumed run continues from, beyond the validated weights (last.pt's `training`)."""
    return {"raw_state_dict": model.state_dict(), "ema": ema.state_dict() if ema else None,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "selector": selector.state_dict(),
            "best_val_probs": best_val_probs, "rng": {"torch": torch.get_rng_state()}}


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
    torch.set_rng_state(state["rng"]["torch"])
    return state["best_val_probs"]


def without_training_state(checkpoint):
    """A checkpoint as OUT/model.pt holds it: the weights and their description, no resume state."""
    return {k: v for k, v in checkpoint.items() if k not in TRAINING_KEYS}


def _arg(name, default=None):
    """A flag's value in a run's args; `default` for runs from before the flag existed (they ran as its default)."""
    return lambda run: (run.get("args") or {}).get(name, default)


def _lineage(name):
    return lambda run: (run.get("lineage") or {}).get(name)


# Settings a resumed run must share with the run it continues: each shapes the network, the data,
# the weights, the per-step learning rate or the image sizes, so a change would silently make a
# run that neither setting describes. One line per flag: (flag, its value in a checkpoint or a
# new run's description). Left out on purpose, free to change on resume: --patience,
# --eval-every, --select, --amp, --device, --channels-last, --compile, --sync-bn.
RESUME_MUST_MATCH = (
    ("--model", lambda run: run.get("model")),
    ("--stem", lambda run: run.get("stem")),
    ("--image-size", lambda run: run.get("image_size")),
    ("--resize", lambda run: run.get("resize", "squash")),
    ("--task", lambda run: run.get("task")),
    ("--data", lambda run: data_location(_arg("data")(run))),
    ("--source", _lineage("source_sha256")),
    ("--freeze", _lineage("frozen_stages")),
    ("--weights", _lineage("weights_sha256")),
    ("--epochs", _arg("epochs")),
    ("--batch-size", _arg("batch_size")),
    ("--min-size", _arg("min_size")),
    ("--warmup-epochs", _arg("warmup_epochs")),
    ("--scheduler", _arg("scheduler")),
    ("--step-size", _arg("step_size")),
    ("--gamma", _arg("gamma")),
    ("--optimizer", _arg("optimizer")),
    ("--lr", _arg("lr")),
    ("--lr-backbone", _arg("lr_backbone")),
    ("--weight-decay", _arg("weight_decay")),
    ("--label-smoothing", _arg("label_smoothing")),
    ("--augment", _arg("augment")),
    ("--mixup", _arg("mixup", 0.0)),
    ("--cutmix", _arg("cutmix", 0.0)),
    ("--class-weights", _arg("class_weights", "none")),
    ("--sampler", _arg("sampler", "shuffle")),
    ("--ema", _arg("ema")),
    ("--select-metric", _arg("select_metric")),
    ("--unlabelled", _arg("unlabelled")),
    ("--unlabelled-weight", _arg("unlabelled_weight", 1.0)),
    ("--threshold", _arg("threshold", 0.95)),
    ("--seed", _arg("seed")),
)
# A transferred run takes these from its --source checkpoint: there they are --source's to answer for.
FROM_SOURCE = {"--model": "--source", "--stem": "--source", "--image-size": "--source", "--resize": "--source",
               "--weights": "--source"}
# How the old value is shown, where the compared value is not what the user typed.
SHOWN = {"--data": _arg("data"), "--source": _lineage("source"), "--weights": _lineage("weights")}


def resume_mismatches(saved, describe):
    """The flags whose values differ between the run in `saved` (last.pt) and this command line.

    describe is the new run's checkpoint description (with its args)."""
    transferred = "source" in (describe.get("lineage") or {})
    flags = [FROM_SOURCE.get(flag, flag) if transferred else flag
             for flag, value in RESUME_MUST_MATCH if value(saved) != value(describe)]
    flags = list(dict.fromkeys(flags))
    # Another task has other classes anyway; the same task and folder with other classes
    # means the data changed under the run.
    if not {"--task", "--data"} & set(flags) and list(saved.get("classes", [])) != list(describe["classes"]):
        flags.append("--data")
    return flags


def check_resume(saved, describe, path):
    """Refuse to continue a run under different settings, in one line naming the flags."""
    flags = resume_mismatches(saved, describe)
    if flags:
        values = dict(RESUME_MUST_MATCH) | SHOWN
        had = " ".join(f"{flag} {values[flag](saved)}" for flag in flags)
        raise UserError(f"--resume: {path} belongs to a run with different {', '.join(flags)} "
                        f"(it had {had}); resume with the same settings, or start a new --out")
