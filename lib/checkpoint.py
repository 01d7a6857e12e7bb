"""Self-describing checkpoints: written atomically, read back without unpickling code.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
torch.load(path, weights_only=True): a file that would run code on load is refused.
Keys: format, model, stem (older checkpoints lack it: lib.models.resolve_stem), classes, image_size, mean, std, args, epoch, metrics, state_dict, and for
resuming training also optimizer, scheduler, rng, and lineage for transferred models.
"""
import hashlib
import pickle
import zipfile
from pathlib import Path

import torch

from lib.errors import UserError
from lib.files import atomic_write
from lib.models import build_model, stems_of

FORMAT = "landmark-classification/1"
REQUIRED = ("format", "model", "classes", "image_size", "mean", "std", "state_dict")


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
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
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


def model_from_checkpoint(checkpoint, where="checkpoint"):
    """Rebuild the network a checkpoint describes and load its weights (eval mode)."""
    stem = checkpoint.get("stem")
    if stem not in (None, *stems_of(checkpoint["model"])):
        raise UserError(f"{where}: weights do not fit model {checkpoint['model']!r} (its stem {stem!r} is none "
                        f"of {', '.join(stems_of(checkpoint['model']))})")
    model = build_model(checkpoint["model"], len(checkpoint["classes"]), checkpoint["image_size"], stem)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        raise UserError(f"{where}: weights do not fit model {checkpoint['model']!r} "
                        f"({str(error).splitlines()[0]})") from None
    return model.eval()


def _data_location(data):
    """--data as a comparable value: 'demo', or the folder's resolved path."""
    return data if data in (None, "demo") else str(Path(data).resolve())


def resume_mismatches(saved, describe):
    """The flags whose values differ between the run in `saved` (last.pt) and this command line.

    describe is the new run's checkpoint description. A transferred run takes its model and
    image size from --source, so there those are --source's to answer for.
    """
    transferred = "lineage" in describe
    saved_lineage, lineage = saved.get("lineage") or {}, describe.get("lineage") or {}
    checks = [
        ("--source" if transferred else "--model", saved.get("model"), describe.get("model")),
        ("--task", saved.get("task"), describe.get("task")),
        ("--data", _data_location(saved.get("args", {}).get("data")), _data_location(describe["args"].get("data"))),
        ("--source" if transferred else "--image-size", saved.get("image_size"), describe.get("image_size")),
        ("--source" if transferred else "--resize", saved.get("resize", "squash"), describe.get("resize", "squash")),
        ("--source", saved_lineage.get("source_sha256"), lineage.get("source_sha256")),
        ("--freeze", saved_lineage.get("frozen_stages"), lineage.get("frozen_stages")),
    ]
    flags = list(dict.fromkeys(flag for flag, old, new in checks if old != new))
    # Another task has other classes anyway; the same task and folder with other classes
    # means the data changed under the run.
    if not {"--task", "--data"} & set(flags) and list(saved.get("classes", [])) != list(describe["classes"]):
        flags.append("--data")
    return flags


def check_resume(saved, describe, path):
    """Refuse to continue a run under different settings, in one line naming the flags."""
    flags = resume_mismatches(saved, describe)
    if flags:
        was = {"--model": saved.get("model"), "--task": saved.get("task"),
               "--data": saved.get("args", {}).get("data"), "--image-size": saved.get("image_size"),
               "--resize": saved.get("resize", "squash"),
               "--source": (saved.get("lineage") or {}).get("source"),
               "--freeze": (saved.get("lineage") or {}).get("frozen_stages")}
        raise UserError(f"--resume: {path} belongs to a run with different {', '.join(flags)} "
                        f"(it had {' '.join(f'{flag} {was[flag]}' for flag in flags)}); "
                        "resume with the same settings, or start a new --out")
