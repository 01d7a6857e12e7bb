"""Exporting a checkpoint to ONNX, checking the export against PyTorch, int8 quantization, timing.

The exported graph takes raw uint8 pixels and does everything training did to them (see
lib.edge for the input contract), so a device feeds decoded pixels and nothing can drift.
The dynamo exporter writes one self-contained file (weights inside, no .data file) with a
dynamic batch axis. Opset 20: the exporter's own opset in torch 2.14 (asking for another adds
onnx's version-conversion pass, a source of breakage), and not the newest, so a device's
runtime need not be either (opset 20 with the IR version 10 the exporter writes: onnxruntime
1.18 or later).
"""
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn

from lib.checkpoint import FORMAT
from lib.files import atomic_write
from lib.data import check_labels_in_classes, load_split
from lib.demo import SOURCE_CLASSES, TARGET_CLASSES, render_image
from lib.edge import INPUT_LAYOUT, METADATA_FORMAT, OnnxClassifier, make_session
from lib.engine import predict_probs
from lib.errors import UserError
from lib.metrics import auroc

OPSET = 20
INPUT_NAME = "pixels"


class PixelClassifier(nn.Module):
    """uint8 (N, H, W, 3) RGB pixels -> probabilities (or logits), preprocessing included.

    The arithmetic is lib.engine.predict_probs's: float, /255, (x - mean) / std.
    """

    def __init__(self, network, mean, std, raw_logits=False):
        super().__init__()
        self.network = network
        self.raw_logits = raw_logits
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixels):
        # Transpose while still uint8: 4x less memory to move, and nothing for the quantizer to touch.
        x = pixels.permute(0, 3, 1, 2).float().div(255)
        logits = self.network((x - self.mean) / self.std)
        return logits if self.raw_logits else torch.softmax(logits, dim=1)


def model_metadata(checkpoint, checkpoint_sha256, raw_logits):
    return {
        "format": METADATA_FORMAT,
        "classes": json.dumps(list(checkpoint["classes"])),
        "image_size": str(checkpoint["image_size"]),
        "mean": json.dumps([float(v) for v in checkpoint["mean"]]),
        "std": json.dumps([float(v) for v in checkpoint["std"]]),
        "input": INPUT_LAYOUT,
        "output": "logits" if raw_logits else "probabilities",
        "architecture": checkpoint["model"],
        "source_checkpoint_sha256": checkpoint_sha256,
        "toolkit_version": f"{FORMAT} (torch {torch.__version__}, onnx {onnx.__version__})",
    }


def set_metadata(model_proto, metadata):
    kept = [p for p in model_proto.metadata_props if p.key not in metadata]
    del model_proto.metadata_props[:]
    model_proto.metadata_props.extend(kept)
    for key, value in metadata.items():
        model_proto.metadata_props.add(key=key, value=value)


def read_metadata(path):
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def export_onnx(network, checkpoint, metadata, out, raw_logits=False):
    """Export to one self-contained file at `out` (atomically) after the full ONNX check."""
    size = checkpoint["image_size"]
    wrapper = PixelClassifier(network, checkpoint["mean"], checkpoint["std"], raw_logits).eval()
    # A batch of 2 as the example: torch.export specialises a dimension of size 1.
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    program = torch.onnx.export(
        wrapper, (example,), input_names=[INPUT_NAME],
        output_names=["logits" if raw_logits else "probabilities"],
        dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch")}},
        opset_version=OPSET, external_data=False, dynamo=True, verbose=False)
    model_proto = program.model_proto
    set_metadata(model_proto, metadata)
    try:
        onnx.checker.check_model(model_proto, full_check=True)
    except onnx.checker.ValidationError as error:
        raise UserError(f"{out}: the exported model fails the ONNX check ({str(error).splitlines()[0]})") from None
    atomic_write(out, lambda tmp: onnx.save_model(model_proto, tmp))
    return wrapper


def generated_images(count, image_size, seed):
    """Demo-style drawings when the checkpoint's data is not at hand (unlabelled for this model)."""
    rng = np.random.default_rng(seed)
    names = SOURCE_CLASSES + TARGET_CLASSES
    pixels = np.stack([render_image(names[i % len(names)], rng, image_size) for i in range(count)])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), None


def reference_images(checkpoint, data, split, count=64, seed=0):
    """(uint8 (N, 3, H, W) images, labels or None, where they came from) to verify or calibrate on.

    data None means the checkpoint's own --data/--task when that folder still exists, else
    generated images.
    """
    args = checkpoint.get("args") or {}
    task = checkpoint.get("task") or args.get("task")
    if data is not None and data != "demo" and not Path(data).is_dir():
        raise UserError(f"--verify-data {data}: no such folder")
    if data is None:
        own = args.get("data")
        if own == "demo" or (own and Path(own).is_dir()):
            data = own
    if data is None:
        # Calibration ("train") and verification draw different images.
        images, labels = generated_images(count, checkpoint["image_size"], seed + (split == "train"))
        return images, labels, f"{count} generated images"
    part = load_split(data, split, task, checkpoint["image_size"])
    if part.labels is not None:
        check_labels_in_classes(part, checkpoint["classes"], f"--verify-data {data}")
    return part.images, part.labels, f"{len(part)} images of {data} ({split})"


def to_nhwc(images):
    return np.ascontiguousarray(images.permute(0, 2, 3, 1).numpy())


def compare(reference, probs, labels, tolerance=None):
    """Differences of `probs` from the PyTorch `reference` probabilities (numpy, (N, C))."""
    row = {"max_abs_diff": float(np.abs(probs - reference).max()),
           "class_agreement": float((probs.argmax(1) == reference.argmax(1)).mean())}
    if labels is not None:
        labels = np.asarray(labels)
        row["accuracy"] = float((probs.argmax(1) == labels).mean())
        row["auroc"] = auroc(labels, probs) if len(np.unique(labels)) > 1 else float("nan")
    if tolerance is not None:
        row["within_tolerance"] = row["max_abs_diff"] <= tolerance
    return row


def verify(network, checkpoint, model_paths, images, labels, big_batch=64, tolerance=1e-4):
    """PyTorch vs each ONNX model on the same images, at batch 1 and at `big_batch`.

    model_paths: {name: (path, held_to_tolerance)}; an int8 model is compared, not held.
    Returns {row name: row}; the "pytorch" row holds the reference accuracy and AUROC.
    """
    reference = predict_probs(network, images, checkpoint["mean"], checkpoint["std"],
                              torch.device("cpu")).numpy()
    pixels = to_nhwc(images)
    rows = {"pytorch": compare(reference, reference, labels)}
    for name, (path, held_to_tolerance) in model_paths.items():
        classifier = OnnxClassifier(path)
        for batch in (1, big_batch):
            probs = classifier.predict_proba(pixels, batch_size=batch)
            rows[f"{name} batch {batch}"] = compare(reference, probs, labels,
                                                     tolerance if held_to_tolerance else None)
    return rows


class _Batches:
    """onnxruntime's CalibrationDataReader protocol over a uint8 NHWC array."""

    def __init__(self, pixels, batch_size=16):
        self.batches = iter([{INPUT_NAME: pixels[i:i + batch_size]} for i in range(0, len(pixels), batch_size)])

    def get_next(self):
        return next(self.batches, None)


def quantize_int8(fp32_path, out, calibration_pixels, activations="uint8"):
    """Static QDQ int8 quantization, per-channel signed weights, MinMax calibration.

    quant_pre_process first (shape inference and the graph simplifications onnxruntime
    recommends before quantizing). Softmax and everything before the first convolution stay
    float: only the network's own operators are quantized.
    """
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quant_pre_process,
                                          quantize_static)

    activation_type = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[activations]
    metadata = read_metadata(fp32_path)
    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))

        def write(tmp):
            quantize_static(str(prepared), tmp, _Batches(calibration_pixels), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=activation_type, weight_type=QuantType.QInt8,
                            op_types_to_quantize=["Conv", "Gemm", "MatMul", "Relu", "MaxPool", "Add",
                                                  "GlobalAveragePool", "Flatten", "Reshape"],
                            calibrate_method=CalibrationMethod.MinMax)
            quantized = onnx.load(tmp)
            set_metadata(quantized, {**metadata, "quantization": f"int8 static QDQ, per-channel QInt8 weights, "
                                                                   f"{activation_type.name} activations"})
            onnx.save_model(quantized, tmp)
        atomic_write(out, write)


def optimize_for_runtime(path, out):
    """Save the graph onnxruntime runs after its optimisations (fusions) for this CPU."""
    import onnxruntime as ort

    def write(tmp):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = tmp
        options.log_severity_level = 3  # its warning says what the docstring says: for this CPU only
        ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    atomic_write(out, write)


def fused_convolutions(path):
    """(fused, total): convolutions onnxruntime runs as int8 kernels after optimising the graph."""
    with tempfile.TemporaryDirectory() as scratch:
        optimized = Path(scratch) / "optimized.onnx"
        optimize_for_runtime(path, optimized)
        ops = [node.op_type for node in onnx.load(str(optimized)).graph.node]
    fused = sum(op in ("QLinearConv", "ConvInteger") for op in ops)
    return fused, fused + sum(op in ("Conv", "FusedConv", "NhwcFusedConv") for op in ops)


def _median_seconds(run, runs, warmup=3):
    for _ in range(warmup):
        run()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def benchmark(wrapper, model_paths, pixels, batch_sizes=(1, 64), runs=20):
    """Median latency in ms of PyTorch eager (the same pixels-in wrapper) and each ONNX model.

    onnxruntime gets as many threads as torch uses, so the comparison is like for like.
    """
    threads = torch.get_num_threads()
    batches = {b: np.ascontiguousarray(np.resize(pixels, (b, *pixels.shape[1:]))) for b in batch_sizes}
    table = {}
    wrapper.eval()
    with torch.inference_mode():
        table["pytorch eager"] = {b: _median_seconds(lambda x=torch.from_numpy(x): wrapper(x), runs) * 1000
                                  for b, x in batches.items()}
    for name, path in model_paths.items():
        session = make_session(path, threads=threads)
        table[f"onnxruntime {name}"] = {
            b: _median_seconds(lambda x=x: session.run(None, {INPUT_NAME: x}), runs) * 1000
            for b, x in batches.items()}
    return table, threads
