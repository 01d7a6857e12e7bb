"""int8 for a target CPU: static QDQ quantization as onnxruntime recommends for it, and the gate
an int8 model must pass before it is written.

Types per target, from onnxruntime's quantization guide ("Data type selection", "When to use
reduce-range and per-channel quantization?"); weights are always int8, per output channel:
- x86 (the default): uint8 activations (U8S8), reduce_range (7-bit weights). CPUs with AVX2 or
  AVX512 but no VNNI multiply U8S8 with VPMADDUBSW, whose 16-bit sums can saturate; 7-bit
  weights keep them in range, and the guide asks for reduce_range with per-channel weights
  there. Correct on every x86-64 CPU, VNNI or not: the safe choice when the device is unknown.
- x86-vnni: U8S8 with full 8-bit weights, for CPUs with AVX512-VNNI, AVX-VNNI or AMX, which
  accumulate in 32 bits and cannot saturate. On a CPU without VNNI this model may saturate,
  and the gate, run on the exporting machine, cannot see that.
- arm64: int8 activations (S8S8), full range: the guide's first choice; ARM has no saturation
  issue, and onnxruntime on ARM fuses signed QDQ into int8 kernels (dot-product instructions
  where the CPU has them). onnxruntime on x86 does not (its QDQIsInt8Allowed is false), which
  is why the x86 targets take uint8 activations: with int8 ones it ran only 8 of ResNet-18's
  20 convolutions as int8 kernels here. An arm64 model is verified here in the graph
  onnxruntime builds on ARM (session.qdqisint8allowed=1), so the gate sees ARM's arithmetic.
"""
import contextlib
import io
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from lib.edge import read_metadata
from lib.metrics import auroc
from lib.onnx_export import INPUT_NAME, check_and_save, match_ir_version, optimize_for_runtime, set_metadata


@dataclass(frozen=True)
class Target:
    activations: str     # "uint8" (U8S8) or "int8" (S8S8); weights are int8 either way
    reduce_range: bool   # 7-bit weights
    runtime_config: dict = field(default_factory=dict)  # session entries giving the target's graph here


TARGETS = {"x86": Target("uint8", reduce_range=True),
           "x86-vnni": Target("uint8", reduce_range=False),
           "arm64": Target("int8", reduce_range=False, runtime_config={"session.qdqisint8allowed": "1"})}
DEFAULT_TARGET = "x86"
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
# Only the network's own operators: Softmax and the pixel scaling before the first convolution stay float.
QUANTIZED_OPS = ["Conv", "Gemm", "MatMul", "Relu", "MaxPool", "Add", "GlobalAveragePool", "Flatten", "Reshape"]


class _Batches:
    """onnxruntime's CalibrationDataReader protocol over a uint8 NHWC array."""

    def __init__(self, pixels, batch_size=16):
        self.batches = iter([{INPUT_NAME: pixels[i:i + batch_size]} for i in range(0, len(pixels), batch_size)])

    def get_next(self):
        return next(self.batches, None)


def recipe(target, method):
    """What the int8 model is, for its metadata and for people."""
    spec = TARGETS[target]
    return {"target": target, "format": "QDQ", "activations": spec.activations, "weights": "int8",
            "per_channel": True, "reduce_range": spec.reduce_range, "calibration": method}


def quantize_int8(fp32_path, out, calibration_pixels, target=DEFAULT_TARGET, method="minmax", metadata=None):
    """Static QDQ int8 quantization of the model at fp32_path for `target`, calibrated with `method`.

    quant_pre_process first (shape inference and the graph simplifications onnxruntime
    recommends before quantizing). The result keeps the float model's opset, IR version and
    metadata, plus `metadata`.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_static
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator, save_tensors_data

    spec = TARGETS[target]
    # quantize_static's own entropy calibration histograms into 128 bins for 128 quantized
    # levels, which leaves one candidate range, the min-max one; 2048 bins as in TensorRT's.
    methods = {"minmax": (CalibrationMethod.MinMax, {}), "entropy": (CalibrationMethod.Entropy, {"num_bins": 2048}),
               "percentile": (CalibrationMethod.Percentile, {})}
    calibrate_method, options = methods[method]
    inherited = read_metadata(fp32_path)
    with tempfile.TemporaryDirectory() as scratch:
        prepared, ranges, quantized_path = (Path(scratch) / name for name in ("prepared.onnx", "ranges.json", "int8.onnx"))
        quant_pre_process(str(fp32_path), str(prepared))
        calibrator = create_calibrator(prepared, QUANTIZED_OPS, augmented_model_path=str(Path(scratch) / "augmented.onnx"),
                                       calibrate_method=calibrate_method, extra_options=options)
        with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators' progress chatter
            calibrator.collect_data(_Batches(calibration_pixels))
            save_tensors_data(calibrator.compute_data(), ranges)
        quantize_static(str(prepared), str(quantized_path), None, quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=spec.reduce_range,
                        activation_type={"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[spec.activations],
                        weight_type=QuantType.QInt8, op_types_to_quantize=QUANTIZED_OPS,
                        calibrate_method=calibrate_method, calibration_cache_path=ranges)
        quantized = onnx.load(str(quantized_path))
    # quant_pre_process imports every opset onnxruntime knows; onnxruntime 1.15 refuses ai.onnx.ml 5.
    match_ir_version(quantized)
    set_metadata(quantized, {**inherited, **(metadata or {})})
    check_and_save(quantized, out)


def fused_convolutions(path, config=None):
    """(fused, total): convolutions onnxruntime runs as int8 kernels after optimising the graph."""
    with tempfile.TemporaryDirectory() as scratch:
        optimized = Path(scratch) / "optimized.onnx"
        optimize_for_runtime(path, optimized, config)
        ops = [node.op_type for node in onnx.load(str(optimized)).graph.node]
    fused = sum(op in ("QLinearConv", "ConvInteger") for op in ops)
    return fused, fused + sum(op in ("Conv", "FusedConv", "NhwcFusedConv") for op in ops)


def class_counts(labels, classes):
    """{class name: images} of a labelled set, None for an unlabelled one."""
    if labels is None:
        return None
    counts = np.bincount(np.asarray(labels), minlength=len(classes))
    return {name: int(count) for name, count in zip(classes, counts)}


def gate_scores(float_probs, int8_probs, labels):
    """Top-1 agreement of the int8 model with the float model, and the AUROC it loses
    (float minus int8; None when the images are unlabelled or hold one class only)."""
    scores = {"agreement": float((int8_probs.argmax(1) == float_probs.argmax(1)).mean()), "auroc_loss": None}
    if labels is not None and len(np.unique(labels)) > 1:
        scores["auroc_loss"] = auroc(labels, float_probs) - auroc(labels, int8_probs)
    return scores


def gate_failures(scores, min_agreement, max_auroc_loss):
    """The gate's failed conditions, as text naming the option that sets each threshold."""
    failures = []
    if scores["agreement"] < min_agreement:
        failures.append(f"top-1 agreement {scores['agreement']:.4f} < {min_agreement:g} (--min-agreement)")
    if scores["auroc_loss"] is not None and scores["auroc_loss"] > max_auroc_loss:
        failures.append(f"AUROC loss {scores['auroc_loss']:.4f} > {max_auroc_loss:g} (--max-auroc-loss)")
    return failures
