"""Running an exported model with onnxruntime, numpy and pillow only: no torch, directly or not.

Input contract of every model export.py writes: one input, uint8 pixels laid out (N, H, W, 3)
in RGB order, as image libraries decode them, with H = W = the model's image size, made square
by the model's resize policy (the "resize" metadata entry; squash when absent); the batch
size N is free. Scaling, mean/std normalisation and the change of layout happen inside the
graph. The output is (N, C) class probabilities, or raw logits for a --raw-logits export (the
"output" metadata entry says which); predict_proba returns probabilities either way.
Class names, image size, the opset, the oldest onnxruntime that runs the model
(min_onnxruntime) and the rest of the facts are the model's metadata_props.
"""
import io
import os
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort

from lib.errors import UserError
from lib.images import DEFAULT_MAX_PIXELS, decode_image
from lib.preprocessing import Preprocessing

# Written by lib.onnx_export; bump both together if the meaning of the metadata changes.
METADATA_FORMAT = "landmark-classification-onnx/1"
REQUIRED_METADATA = ("format", "classes", "image_size", "mean", "std", "input", "output")
INPUT_LAYOUT = "uint8 NHWC RGB"
CPU = "CPUExecutionProvider"


def softmax(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def parse_version(text):
    """'1.15.1' or '1.17.0+cu118' -> (1, 15, 1) / (1, 17, 0), for comparing releases."""
    match = re.match(r"\d+(\.\d+)*", str(text).strip())
    if not match:
        raise ValueError(f"not a version: {text!r}")
    return tuple(int(part) for part in match.group(0).split("."))


# --- reading metadata_props without onnxruntime (or onnx) --------------------------------------
# An onnxruntime too old for a model refuses to load it with a message about IR versions or
# opsets, before its metadata could say which runtime it needs. So the metadata is read from
# the file first: ModelProto's top-level protobuf fields, skipping the graph without reading it.

def _varint(stream):
    result = shift = 0
    while True:
        byte = stream.read(1)
        if not byte:
            raise EOFError
        result |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return result
        shift += 7


def _fields(stream, size, keep):
    """Yield (field number, value) of the protobuf message in stream up to `size`: integers, and
    the bytes of the length-delimited fields numbered in `keep` (the others are skipped)."""
    while stream.tell() < size:
        field, wire = divmod(_varint(stream), 8)
        if wire == 0:
            yield field, _varint(stream)
        elif wire in (1, 2, 5):
            length = {1: 8, 5: 4}.get(wire) or _varint(stream)
            if stream.tell() + length > size:
                raise EOFError
            if wire == 2 and field in keep:
                yield field, stream.read(length)
            else:
                stream.seek(length, io.SEEK_CUR)
        else:
            raise ValueError(f"wire type {wire}")


def read_metadata(path):
    """The model's metadata_props as a dict, read straight from the file."""
    metadata = {}
    try:
        with open(path, "rb") as stream:
            size = os.fstat(stream.fileno()).st_size
            for field, entry in _fields(stream, size, keep={14}):
                if field == 14:  # ModelProto.metadata_props: StringStringEntryProto key = 1, value = 2
                    fields = dict(_fields(io.BytesIO(entry), len(entry), keep={1, 2}))
                    metadata[fields.get(1, b"").decode()] = fields.get(2, b"").decode()
    except (EOFError, ValueError, TypeError, UnicodeDecodeError):
        raise UserError(f"{path}: not a loadable ONNX model (truncated, or not ONNX)") from None
    return metadata


def check_runtime(path, metadata, installed=ort.__version__):
    """Refuse a model whose min_onnxruntime is newer than the installed onnxruntime."""
    needed = metadata.get("min_onnxruntime")
    if not needed:
        return
    try:
        too_old = parse_version(installed) < parse_version(needed)
    except ValueError:
        raise UserError(f"{path}: min_onnxruntime {needed!r} in its metadata is not a version") from None
    if too_old:
        raise UserError(f"{path}: needs onnxruntime >= {needed} (opset {metadata.get('opset', '?')}), "
                        f"this is {installed}: upgrade onnxruntime, or export for it (export.py --opset)")


# --- sessions ------------------------------------------------------------------------------------

def make_session(path, provider=CPU, threads=0, config=None):
    """An onnxruntime session on `provider` (CPU for what it cannot run); threads=0: onnxruntime chooses.

    config: session configuration entries, e.g. {"session.qdqisint8allowed": "1"}.
    """
    available = ort.get_available_providers()
    if provider not in available:
        raise UserError(f"--provider {provider}: not in this onnxruntime {ort.__version__}; "
                        f"available: {', '.join(available)}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    providers = [provider] if provider == CPU else [provider, CPU]
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as error:  # onnxruntime raises its own (non-public) exception types
        # onnxruntime >= 1.24 refuses external data outside the model's folder here, too.
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{path}: not a loadable ONNX model ({first})") from None


class OnnxClassifier:
    """An exported classifier: .preprocessing (lib.preprocessing's record, from the metadata: classes,
    image size, resize policy, ...), .predict_proba(uint8 (N, H, W, 3))."""

    def __init__(self, path, provider=CPU, threads=0, config=None):
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such model file")
        self.path = path
        metadata = read_metadata(path)
        check_runtime(path, metadata)
        self.session = make_session(path, provider, threads, config)
        missing = [key for key in REQUIRED_METADATA if key not in metadata]
        if missing or metadata.get("format") != METADATA_FORMAT:
            raise UserError(f"{path}: not a model written by export.py (metadata "
                            f"{'lacks ' + ', '.join(missing) if missing else 'format differs'})")
        if metadata["input"] != INPUT_LAYOUT:
            raise UserError(f"{path}: input {metadata['input']!r} is not {INPUT_LAYOUT!r}")
        self.metadata = metadata
        self.preprocessing = Preprocessing.from_onnx_metadata(metadata, where=path)
        self.returns_logits = metadata["output"] == "logits"
        self.input_name = self.session.get_inputs()[0].name

    def blank_batch(self, batch_size=1):
        size = self.preprocessing.image_size
        return np.zeros((batch_size, size, size, 3), np.uint8)

    def run(self, pixels):
        """The graph's raw output for one batch of uint8 pixels (no checks)."""
        return self.session.run(None, {self.input_name: pixels})[0]

    def warm_up(self):
        """One run on a blank image: the first run allocates and picks kernels, so it is slow."""
        self.run(self.blank_batch())

    def predict_proba(self, images, batch_size=64):
        """Probabilities (N, C) float32 for uint8 images (N, image_size, image_size, 3), RGB."""
        images = np.asarray(images)
        expected = (self.preprocessing.image_size, self.preprocessing.image_size, 3)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected:
            raise UserError(f"{self.path}: expects uint8 images of shape (N, {', '.join(map(str, expected))}), "
                            f"got {images.dtype} {images.shape}")
        outputs = [self.run(np.ascontiguousarray(images[i:i + batch_size]))
                   for i in range(0, len(images), batch_size)]
        if not outputs:
            return np.empty((0, len(self.preprocessing.classes)), dtype=np.float32)
        scores = np.concatenate(outputs).astype(np.float32)
        return softmax(scores) if self.returns_logits else scores

    def decode(self, path, max_pixels=DEFAULT_MAX_PIXELS):
        """One image file as (H, W, 3) uint8, decoded and made square as training did
        (lib.images.decode_image; BadImageError for a file it cannot read)."""
        return decode_image(path, self.preprocessing.image_size, self.preprocessing.resize, max_pixels)
