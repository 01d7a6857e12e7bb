"""Starting training from weights you already have: a torchvision-format state_dict file.

Such a file is what `torch.save(torchvision.models.resnet18(weights=...).state_dict(), path)`
writes: a dict from parameter and buffer names to tensors, the format torchvision's own weights
download as. It is read with torch.load(..., weights_only=True), so a file that would run code on
load is refused, and nothing is ever downloaded. The head's tensors are skipped: the task's
classes get a fresh classifier whatever the file's number of classes, as in timm's
`pretrained=True, num_classes=N`. Every other tensor must be in the file with the model's shape.
"""
import pickle
import zipfile
from pathlib import Path

import torch

from lib.checkpoint import file_hash
from lib.errors import UserError
from lib.models import architecture, head_name

# The keys a weights file adds to a checkpoint's lineage (and a transferred model inherits).
WEIGHTS_LINEAGE = ("weights", "weights_sha256")


def read_state_dict(path):
    """{name: tensor} of a state_dict file; any problem is a UserError naming --weights."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--weights {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else "refused"
        raise UserError(f"--weights {path}: refused, it is not a plain state_dict "
                        f"(weights_only load failed: {first})") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, LookupError) as error:
        raise UserError(f"--weights {path}: not a readable weights file "
                        f"({str(error).splitlines()[0] if str(error) else type(error).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state and "format" in state:
        raise UserError(f"--weights {path}: a checkpoint of this toolkit, not a state_dict; "
                        f"start from it with transfer.py --source {path}")
    if not isinstance(state, dict) or not state or not all(
            isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()):
        raise UserError(f"--weights {path}: not a state_dict (a dict of tensor names to tensors, "
                        "as torch.save(model.state_dict(), path) writes)")
    return state


def load_weights(model, name, path):
    """Copy every tensor of the state_dict file at `path` into `model` (architecture `name`) except
    the head's, and return the lineage entry {"weights": resolved path, "weights_sha256": hex}.

    The file must hold exactly the model's tensors outside the head, with the same shapes (the
    auxiliary heads of GoogLeNet and Inception v3, which the model is built without, are skipped
    too); otherwise a UserError names the first tensor that differs, with both shapes.
    """
    state = read_state_dict(path)
    skipped = (head_name(name) + ".", *architecture(name).aux_heads)
    expected = {key: value for key, value in model.state_dict().items() if not key.startswith(skipped)}
    given = {key: value for key, value in state.items() if not key.startswith(skipped)}
    for key, value in expected.items():
        if key not in given:
            raise UserError(f"--weights {path}: has no tensor {key} (shape {list(value.shape)} in {name}); "
                            f"is it the state_dict of another architecture?")
        if given[key].shape != value.shape:
            raise UserError(f"--weights {path}: tensor {key} has shape {list(given[key].shape)} in the file "
                            f"and {list(value.shape)} in {name}")
    extra = next((key for key in given if key not in expected), None)
    if extra is not None:
        raise UserError(f"--weights {path}: its tensor {extra} (shape {list(given[extra].shape)}) is not "
                        f"in {name}; is it the state_dict of another architecture?")
    model.load_state_dict(given, strict=False)
    return {"weights": str(Path(path).resolve()), "weights_sha256": file_hash(path)}
