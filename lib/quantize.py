"""int8 for a target CPU: static QDQ quantization as onnxruntime recommends for it, tried recipe
by recipe until one passes the accuracy gate (lib.int8_gate).

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

When the gate refuses a model, more precise recipes for the same target follow, in this order
(recipes_to_try): the calibration asked for (default minmax); the other of minmax and
percentile (percentile clips the 0.001% most extreme activations so the rest get finer
steps); the first calibration with the first convolution and the classifier layer kept in
float, the layers whose rounding reaches the output least diluted (a little slower on the
device); last, entropy calibration (the range that loses least information, as TensorRT's),
last because onnxruntime searches for it in a Python loop: seconds per activation tensor here,
where a whole minmax model takes half a second. The target's types (activations, reduce_range)
never change: they decide what is correct on the device, which a gate run on this machine
cannot see (a model without reduce_range may saturate on an x86 CPU without VNNI, and this
one's VNNI would hide it).
"""
import contextlib
import io
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from lib.edge import OnnxClassifier, read_metadata
from lib.int8_gate import describe
from lib.onnx_export import (INPUT_NAME, check_and_save, match_ir_version, optimize_for_runtime, set_metadata,
                             stamp_metadata)


@dataclass(frozen=True)
class Target:
    activations: str     # "uint8" (U8S8) or "int8" (S8S8); weights are int8 either way
    reduce_range: bool   # 7-bit weights
    runtime_config: dict = field(default_factory=dict)  # session entries giving the target's graph here


TARGETS = {"x86": Target("uint8", reduce_range=True),
           "x86-vnni": Target("uint8", reduce_range=False),
           "arm64": Target("int8", reduce_range=False, runtime_config={"session.qdqisint8allowed": "1"})}
DEFAULT_TARGET = "x86"
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
# Only the network's own operators: Softmax and the pixel scaling before the first convolution stay float.
QUANTIZED_OPS = ["Conv", "Gemm", "MatMul", "Relu", "MaxPool", "Add", "GlobalAveragePool", "Flatten", "Reshape"]


class _Batches:
    """onnxruntime's CalibrationDataReader protocol over a uint8 NHWC array."""

    def __init__(self, pixels, batch_size=16):
        self.batches = iter([{INPUT_NAME: pixels[i:i + batch_size]} for i in range(0, len(pixels), batch_size)])

    def get_next(self):
        return next(self.batches, None)


@dataclass(frozen=True)
class Recipe:
    """One way to make the int8 model: the target's types, a calibration method, and whether the
    first convolution and the classifier layer stay in float."""
    target: str
    calibration: str
    float_ends: bool = False

    def metadata(self):
        """What the int8 model is, for its metadata."""
        spec = TARGETS[self.target]
        return {"target": self.target, "format": "QDQ", "activations": spec.activations, "weights": "int8",
                "per_channel": True, "reduce_range": spec.reduce_range, "calibration": self.calibration,
                "float_layers": "first convolution, classifier" if self.float_ends else "none"}

    def __str__(self):
        spec = TARGETS[self.target]
        ends = ", first convolution and classifier in float" if self.float_ends else ""
        return (f"{self.target} ({spec.activations} activations, int8 weights per channel, reduce_range "
                f"{spec.reduce_range}), {self.calibration} calibration{ends}")


def recipes_to_try(target, first_method="minmax"):
    """The recipes for `target`, in the order they are tried (see the module's docstring): the
    calibration asked for, the other fast one, the first with its end layers in float, entropy."""
    fast = [m for m in CALIBRATION_METHODS if m not in (first_method, "entropy")]
    recipes = [Recipe(target, m) for m in [first_method, *fast]] + [Recipe(target, first_method, float_ends=True)]
    return recipes + ([Recipe(target, "entropy")] if first_method != "entropy" else [])


def _end_layers(model_proto):
    """Names of the first convolution and the last Gemm/MatMul (the classifier) in graph order;
    in an ensemble (lib.models.Ensemble) every member's: the convolutions that read what the
    first one reads, and the Gemm/MatMul feeding each member's LogSoftmax."""
    nodes = model_proto.graph.node
    first = next((n for n in nodes if n.op_type == "Conv"), None)
    firsts = [n.name for n in nodes if first is not None and n.op_type == "Conv" and n.input[0] == first.input[0]]
    producer = {output: n for n in nodes for output in n.output}
    heads = [producer.get(n.input[0]) for n in nodes if n.op_type == "LogSoftmax"]
    classifiers = [h.name for h in heads if h is not None and h.op_type in ("Gemm", "MatMul")]
    last = next((n.name for n in reversed(nodes) if n.op_type in ("Gemm", "MatMul")), None)
    return [name for name in firsts + (classifiers or [last]) if name]


def quantize_int8(fp32_path, out, calibration_pixels, recipe, metadata=None):
    """Static QDQ int8 quantization of the model at fp32_path by `recipe` (a Recipe), calibrated
    on uint8 (N, H, W, 3) pixels.

    quant_pre_process first (shape inference and the graph simplifications onnxruntime
    recommends before quantizing). The result keeps the float model's opset, IR version and
    metadata, plus the recipe's (`quantization`) and `metadata`.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_static
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator, save_tensors_data

    spec = TARGETS[recipe.target]
    # quantize_static's own entropy calibration histograms into 128 bins for 128 quantized
    # levels, which leaves one candidate range, the min-max one; 2048 bins as in TensorRT's.
    methods = {"minmax": (CalibrationMethod.MinMax, {}), "entropy": (CalibrationMethod.Entropy, {"num_bins": 2048}),
               "percentile": (CalibrationMethod.Percentile, {})}
    calibrate_method, options = methods[recipe.calibration]
    inherited = read_metadata(fp32_path)
    with tempfile.TemporaryDirectory() as scratch:
        prepared, ranges, quantized_path = (Path(scratch) / name for name in ("prepared.onnx", "ranges.json", "int8.onnx"))
        # Symbolic shape inference (written for transformers' dynamic shapes) loses the batch dimension
        # of some layers (it cannot read the axes input of opset 18's ReduceMax, fastnet's global
        # max-pool) and gives up where an ensemble's members meet, leaving sym_shape_infer_temp.onnx
        # in the working folder; onnx's shape inference, which quant_pre_process runs too, infers it all.
        ensemble = json.loads(inherited.get("ensemble", "null")) is not None
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=ensemble)
        kept_float = _end_layers(onnx.load(str(prepared))) if recipe.float_ends else []
        calibrator = create_calibrator(prepared, QUANTIZED_OPS, augmented_model_path=str(Path(scratch) / "augmented.onnx"),
                                       calibrate_method=calibrate_method, extra_options=options)
        with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators' progress chatter
            calibrator.collect_data(_Batches(calibration_pixels))
            save_tensors_data(calibrator.compute_data(), ranges)
        quantize_static(str(prepared), str(quantized_path), None, quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=spec.reduce_range,
                        activation_type={"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[spec.activations],
                        weight_type=QuantType.QInt8, op_types_to_quantize=QUANTIZED_OPS, nodes_to_exclude=kept_float,
                        calibrate_method=calibrate_method, calibration_cache_path=ranges)
        quantized = onnx.load(str(quantized_path))
    # quant_pre_process imports every opset onnxruntime knows; onnxruntime 1.15 refuses ai.onnx.ml 5.
    match_ir_version(quantized)
    set_metadata(quantized, {**inherited, "quantization": json.dumps(recipe.metadata()), **(metadata or {})})
    check_and_save(quantized, out)


def fused_convolutions(path, config=None):
    """(fused, total): convolutions onnxruntime runs as int8 kernels after optimising the graph."""
    with tempfile.TemporaryDirectory() as scratch:
        optimized = Path(scratch) / "optimized.onnx"
        optimize_for_runtime(path, optimized, config)
        ops = [node.op_type for node in onnx.load(str(optimized)).graph.node]
    fused = sum(op in ("QLinearConv", "ConvInteger") for op in ops)
    return fused, fused + sum(op in ("Conv", "FusedConv", "NhwcFusedConv") for op in ops)


def quantize_gated(fp32_path, out, calibration_pixels, recipes, gate, pixels, float_probs, labels,
                   metadata=None, batch_size=64):
    """Quantize by each recipe in turn and keep, at `out`, the first int8 model `gate` passes.

    pixels: uint8 (N, H, W, 3) verification images, never the calibration ones; float_probs:
    the float model's (N, C) probabilities on them; labels (N,) or None. Each attempt's figures
    are printed. Returns (the kept Recipe or None, [each attempt's recipe and verdict]); the kept
    model's metadata records its recipe (`quantization`, with the attempts refused before it)
    and its verdict (`int8_gate`). When no recipe passes, nothing is left at `out`.
    """
    attempts = []
    for number, recipe in enumerate(recipes, 1):
        quantize_int8(fp32_path, out, calibration_pixels, recipe, metadata)
        config = TARGETS[recipe.target].runtime_config
        fused, total = fused_convolutions(out, config)
        print(f"int8 attempt {number} of {len(recipes)}: {recipe}; onnxruntime runs {fused} of {total} "
              f"convolutions as int8 kernels{' in its ARM graph' if recipe.target == 'arm64' else ''}")
        verdict = gate.judge(float_probs, OnnxClassifier(out, config=config).predict_proba(pixels, batch_size),
                             labels)
        for line in describe(verdict):
            print(f"  {line}")
        refused = [{"recipe": a["recipe"].metadata(), "failures": a["verdict"]["failures"]} for a in attempts]
        attempts.append({"recipe": recipe, "verdict": verdict})
        if verdict["passed"]:
            print(f"  int8 gate passed: kept attempt {number}")
            stamp_metadata(out, {"quantization": json.dumps({**recipe.metadata(), "attempt": number,
                                                             "refused_before": refused}),
                                 "int8_gate": json.dumps(verdict)})
            return recipe, attempts
        print(f"  int8 gate refused it: {'; '.join(verdict['failures'])}")
    Path(out).unlink()
    return None, attempts
