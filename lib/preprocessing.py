"""What a model needs done to an image before it sees it, as one frozen record, and the defaults.

A checkpoint (lib.checkpoint.read_preprocessing) and an exported model's metadata
(Preprocessing.from_onnx_metadata) each give the same record, with what older files lack filled
in there, as those files were made; everything downstream reads the record. Torch-free:
lib.edge (and so predict.py) reads it too.
"""
import json
from dataclasses import dataclass

from lib.errors import UserError

RESIZE_POLICIES = ("squash", "crop", "pad")
# What files from before --resize did, and what --resize does unless told otherwise.
DEFAULT_RESIZE = "squash"
DEFAULT_IMAGE_SIZE = 64


def check_resize(resize, where="--resize"):
    if resize not in RESIZE_POLICIES:
        raise UserError(f"{where} {resize!r}: must be one of {', '.join(RESIZE_POLICIES)}")
    return resize


@dataclass(frozen=True)
class Preprocessing:
    """A model's input facts: pixels are decoded to image_size x image_size by the resize policy
    (lib.images), scaled to [0, 1] and normalised per channel with mean and std (RGB, on the
    [0, 1] scale; lib.inference); the outputs are `classes`, in order. model and stem name the
    network that rebuilds it (lib.models); an exported model from before they were recorded has
    None there."""
    image_size: int
    resize: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    classes: tuple[str, ...]
    model: str | None
    stem: str | None

    @classmethod
    def from_onnx_metadata(cls, metadata, where):
        """The record an exported model's metadata_props (a dict of strings) give; one written before
        the resize entry squashed. `where` names the model in a UserError for a bad entry."""
        return cls(image_size=int(metadata["image_size"]),
                   resize=check_resize(metadata.get("resize", DEFAULT_RESIZE), where=f"{where}: metadata resize"),
                   mean=_floats(json.loads(metadata["mean"])), std=_floats(json.loads(metadata["std"])),
                   classes=tuple(json.loads(metadata["classes"])),
                   model=metadata.get("architecture"), stem=metadata.get("stem"))

    def onnx_metadata(self):
        """The metadata_props entries from_onnx_metadata reads back: strings, JSON where a value is not one."""
        return {"classes": json.dumps(list(self.classes)), "image_size": str(self.image_size), "resize": self.resize,
                "mean": json.dumps(list(self.mean)), "std": json.dumps(list(self.std)),
                "architecture": self.model, "stem": self.stem}


def _floats(values):
    return tuple(float(v) for v in values)
