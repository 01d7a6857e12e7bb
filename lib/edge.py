"""Running an exported model with onnxruntime, numpy and pillow only: no torch, directly or not.

Input contract of every model export.py writes: one input, uint8 pixels laid out (N, H, W, 3)
in RGB order, as image libraries decode them, with H = W = the model's image size; the batch
size N is free. Scaling, mean/std normalisation and the change of layout happen inside the
graph. The output is (N, C) class probabilities, or raw logits for a --raw-logits export (the
"output" metadata entry says which); predict_proba returns probabilities either way.
Class names, image size and the rest of the preprocessing facts are the model's metadata_props.
"""
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from lib.errors import UserError
from lib.images import decode_image

# Written by lib.onnx_export; bump both together if the meaning of the metadata changes.
METADATA_FORMAT = "landmark-classification-onnx/1"
REQUIRED_METADATA = ("format", "classes", "image_size", "mean", "std", "input", "output")
INPUT_LAYOUT = "uint8 NHWC RGB"


def softmax(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def make_session(path, providers=("CPUExecutionProvider",), threads=0):
    """An onnxruntime session with explicit providers; threads=0 lets onnxruntime choose."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
    except Exception as error:  # onnxruntime raises its own (non-public) exception types
        # onnxruntime >= 1.24 refuses external data outside the model's folder here, too.
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{path}: not a loadable ONNX model ({first})") from None


class OnnxClassifier:
    """An exported classifier: .classes, .image_size, .predict_proba(uint8 (N, H, W, 3))."""

    def __init__(self, path, providers=("CPUExecutionProvider",), threads=0):
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such model file")
        self.path = path
        self.session = make_session(path, providers, threads)
        metadata = self.session.get_modelmeta().custom_metadata_map
        missing = [key for key in REQUIRED_METADATA if key not in metadata]
        if missing or metadata.get("format") != METADATA_FORMAT:
            raise UserError(f"{path}: not a model written by export.py (metadata "
                            f"{'lacks ' + ', '.join(missing) if missing else 'format differs'})")
        if metadata["input"] != INPUT_LAYOUT:
            raise UserError(f"{path}: input {metadata['input']!r} is not {INPUT_LAYOUT!r}")
        self.metadata = dict(metadata)
        self.classes = list(json.loads(metadata["classes"]))
        self.image_size = int(metadata["image_size"])
        self.returns_logits = metadata["output"] == "logits"
        self.input_name = self.session.get_inputs()[0].name

    def predict_proba(self, images, batch_size=64):
        """Probabilities (N, C) float32 for uint8 images (N, image_size, image_size, 3), RGB."""
        images = np.asarray(images)
        expected = (self.image_size, self.image_size, 3)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected:
            raise UserError(f"{self.path}: expects uint8 images of shape (N, {', '.join(map(str, expected))}), "
                            f"got {images.dtype} {images.shape}")
        outputs = [self.session.run(None, {self.input_name: np.ascontiguousarray(images[i:i + batch_size])})[0]
                   for i in range(0, len(images), batch_size)]
        if not outputs:
            return np.empty((0, len(self.classes)), dtype=np.float32)
        scores = np.concatenate(outputs).astype(np.float32)
        return softmax(scores) if self.returns_logits else scores

    def load_images(self, paths):
        """Decode and resize image files as training did, stacked as (N, H, W, 3) uint8."""
        return np.stack([decode_image(p, self.image_size) for p in paths])
