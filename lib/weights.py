"""Starting training from weights: torchvision's published weights by name, or a state_dict file.

--weights takes either
- a name of the model's published weights, as torchvision.models.get_model_weights(MODEL) lists
  them (DEFAULT, IMAGENET1K_V1, ... or the full ResNet18_Weights.IMAGENET1K_V1). They come
  through torchvision's own loader and cache ($TORCH_HOME/hub/checkpoints, ~/.cache/torch/hub/...
  without TORCH_HOME): a machine that has the file there needs no network, one without it
  downloads it once. Their preprocessing (mean, std and the resolution they were trained at,
  weights.transforms()) is what the run uses unless the user says otherwise.
- or a state_dict file, as `torch.save(torchvision.models.resnet18(weights=...).state_dict(), path)`
  writes it: a dict from parameter and buffer names to tensors.
Either is read with torch.load(..., weights_only=True), so a file that would run code on load is
refused. The head's tensors are skipped: the task's classes get a fresh classifier whatever the
weights' number of classes, as in timm's `pretrained=True, num_classes=N`. Every other tensor
must be there with the model's shape, with two allowances for files saved by other code: the
prefix a wrapper adds to every name (DataParallel's `module.`, torch.compile's `_orig_mod.`) is
removed, and BatchNorm's num_batches_tracked, which older PyTorch did not save, may be missing.
"""
import pickle
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from lib.checkpoint import file_hash
from lib.errors import UserError
from lib.models import architecture, head_name
from lib.preprocessing import DEFAULT_IMAGE_SIZE

# The keys weights add to a checkpoint's lineage (and a transferred model inherits): weights is
# the file's resolved path or the published weights' full name; weights_url only for the latter.
WEIGHTS_LINEAGE = ("weights", "weights_url", "weights_sha256")
# Prefixes a wrapper puts before every name of the model it wraps: DataParallel and
# DistributedDataParallel (module.), torch.compile (_orig_mod.); they nest in either order.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# A name, not a path: IMAGENET1K_V1, DEFAULT, or ResNet18_Weights.IMAGENET1K_V1.
_NAME = re.compile(r"^(?:(\w+_Weights)\.)?(\w+)$")
# GoogLeNet's and Inception v3's weights were trained on pixels scaled to [-1, 1]; torchvision's
# builders add transform_input=True to turn ImageNet-normalised input into that. Normalising with
# mean = std = 0.5 gives the network the same numbers without the extra layer.
_UNIT_RANGE_WEIGHTS = ("googlenet", "inception_v3")
# torchvision's DenseNet weights keep names from before a rename ('norm.1' -> 'norm1');
# torchvision.models.densenet._load_state_dict renames them with this same pattern.
_DENSENET_OLD_NAME = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


@dataclass(frozen=True)
class Weights:
    """Weights to start from. mean, std (per channel, 0..1 scale) and image_size (px) are the
    published weights' preprocessing, None for a file, which does not say."""
    state: dict           # {name: tensor}
    lineage: dict         # the checkpoint's lineage entries (WEIGHTS_LINEAGE)
    where: str            # "--weights VALUE", to name in messages
    described: str        # for the log: what they are and where they were read from
    mean: list | None = None
    std: list | None = None
    image_size: int | None = None


def published(model_name, value):
    """The torchvision weights enum member `value` names for `model_name`, or None when `value`
    is a file (an existing path, or anything that is not a name). A name the model does not
    have is a UserError listing the names it has."""
    match = _NAME.match(str(value))
    if Path(value).is_file() or match is None:
        return None
    try:
        choices = torchvision.models.get_model_weights(model_name)
    except ValueError:
        raise UserError(f"--weights {value}: {model_name} has no published weights (torchvision publishes "
                        f"them for its own models); give a state_dict file") from None
    names = ", ".join(["DEFAULT", *(w.name for w in choices)])
    if match.group(1) not in (None, choices.__name__) or match.group(2) not in choices.__members__:
        raise UserError(f"--weights {value}: no such file, nor published weights of {model_name} "
                        f"(torchvision has {choices.__name__}: {names})")
    return choices[match.group(2)]


def open_weights(model_name, value):
    """The Weights --weights `value` gives for `model_name`: published weights by name (from
    torchvision's cache, downloaded into it if missing) or a state_dict file. Any problem is a
    UserError naming --weights: no such file or name, no network and nothing cached (naming
    the URL and the cache path to put the file at), not a plain state_dict."""
    choice = published(model_name, value)
    if choice is None:
        state = read_state_dict(value)
        return Weights(state, {"weights": str(Path(value).resolve()), "weights_sha256": file_hash(value)},
                       f"--weights {value}", f"from {value}")
    return _published_weights(model_name, value, choice)


def _published_weights(model_name, value, choice):
    full_name, where = f"{type(choice).__name__}.{choice.name}", f"--weights {value}"
    path = cache_path(choice.url)
    was_cached = path.is_file()
    try:
        state = choice.get_state_dict(progress=True, check_hash=True, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if was_cached:
            raise UserError(f"{where}: the cached file {path} is not readable ({reason}); delete it to "
                            f"download {full_name} again") from None
        raise UserError(f"{where}: {full_name} is not cached and could not be downloaded ({reason}); "
                        f"download {choice.url} and put it at {path}") from None
    sha256 = file_hash(path)
    expected = torch.hub.HASH_REGEX.search(path.name)
    if expected and not sha256.startswith(expected.group(1)):
        print(f"warning: {path} does not have the sha256 its name promises ({expected.group(1)}...); "
              f"delete it to download {full_name} again", file=sys.stderr)
    if model_name.startswith("densenet"):
        state = {_DENSENET_OLD_NAME.sub(r"\1\2", key): tensor for key, tensor in state.items()}
    mean, std = ([0.5] * 3, [0.5] * 3) if model_name in _UNIT_RANGE_WEIGHTS else (None, None)
    preset = choice.transforms()
    return Weights(state, {"weights": full_name, "weights_url": choice.url, "weights_sha256": sha256},
                   where, f"{full_name} from torchvision ({path})", mean or list(preset.mean),
                   std or list(preset.std), int(preset.crop_size[0]))


def cache_path(url):
    """Where torchvision's loader keeps the file at `url` (torch.hub.load_state_dict_from_url's rule)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


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


def unwrapped(state):
    """The state_dict with the prefixes wrappers add (WRAPPER_PREFIXES) taken off its names, in
    whatever order and number they nest; a copy."""
    state = dict(state)
    while any(key.startswith(WRAPPER_PREFIXES) for key in state):
        for prefix in WRAPPER_PREFIXES:
            consume_prefix_in_state_dict_if_present(state, prefix)
    return state


def load_weights(model, name, weights):
    """Copy every tensor of `weights` (a Weights) into `model` (architecture `name`) except the
    head's, and return the lineage entries to record.

    The weights must hold the model's tensors outside the head, with the same shapes (the
    auxiliary heads of GoogLeNet and Inception v3, which the model is built without, are skipped
    too; num_batches_tracked may be missing: the model keeps its own); otherwise a UserError
    names the first tensor that differs, with both shapes.
    """
    skipped = (head_name(name) + ".", *architecture(name).aux_heads)
    expected = {key: value for key, value in model.state_dict().items() if not key.startswith(skipped)}
    given = {key: value for key, value in unwrapped(weights.state).items() if not key.startswith(skipped)}
    for key, value in expected.items():
        if key not in given and not key.endswith("num_batches_tracked"):
            raise UserError(f"{weights.where}: has no tensor {key} (shape {list(value.shape)} in {name}); "
                            f"is it the state_dict of another architecture?")
        if key in given and given[key].shape != value.shape:
            raise UserError(f"{weights.where}: tensor {key} has shape {list(given[key].shape)} in the file "
                            f"and {list(value.shape)} in {name}")
    extra = next((key for key in given if key not in expected), None)
    if extra is not None:
        raise UserError(f"{weights.where}: its tensor {extra} (shape {list(given[extra].shape)}) is not "
                        f"in {name}; is it the state_dict of another architecture?")
    model.load_state_dict(given, strict=False)
    return weights.lineage


def metadata(lineage):
    """What an exported model's metadata says of the weights training started from: the file's
    path, or the published weights' name and URL, with the sha256; None for random weights."""
    if "weights" not in lineage:
        return None
    if "weights_url" in lineage:
        return {"name": lineage["weights"], "url": lineage["weights_url"], "sha256": lineage["weights_sha256"]}
    return {"path": lineage["weights"], "sha256": lineage["weights_sha256"]}


# The sizes photos are trained at by default: the largest at or below the photos' short side.
# 64 px: the landmark recipe's; 128 px: measured better on larger photos (docs/recipes.md, "Image
# size for photos"), at 4x the FLOPs.
PHOTO_SIZES = (DEFAULT_IMAGE_SIZE, 128)


def image_size_for(given, weights, photo_side):
    """(image size in px, why): --image-size when given, else the resolution published weights
    were trained at, else the largest of PHOTO_SIZES at or below `photo_side` (the training photos'
    median short side in px, lib.data.photo_side; None: unknown), PHOTO_SIZES[0] at least."""
    if given:
        return given, "--image-size"
    if weights is not None and weights.image_size:
        return weights.image_size, (f"the resolution {weights.lineage['weights']} was trained at "
                                    "(weights.transforms()); --image-size changes it")
    size = max([s for s in PHOTO_SIZES if photo_side is not None and s <= photo_side], default=PHOTO_SIZES[0])
    return size, (f"the training photos' median short side is {photo_side} px; --image-size changes it"
                  if photo_side is not None else "the default; --image-size changes it")


def normalisation(mean, std, weights, train):
    """(mean, std, whose): --mean/--std when given, else published weights' own, else the
    training split's statistics."""
    if mean is not None:
        return mean, std, "--mean/--std"
    if weights is not None and weights.mean is not None:
        return weights.mean, weights.std, f"{weights.lineage['weights']}'s own; --mean/--std change it"
    return train.mean, train.std, "the training split"
