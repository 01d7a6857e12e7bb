"""lib.benchmark: the timing primitives, the device benchmark (predict.py --benchmark) and PyTorch
against onnxruntime (export.py --benchmark), on a tiny hand-made ONNX model; no time is asserted."""
import json
import subprocess
import sys

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from conftest import REPO
from lib import benchmark
from lib.edge import INPUT_LAYOUT, METADATA_FORMAT
from lib.export_set import eager_runner

SIZE = 4


def _tiny_model(path):
    """uint8 (N, SIZE, SIZE, 3) pixels -> their mean per channel as (N, 3) "probabilities", with the
    metadata lib.edge.OnnxClassifier requires."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["pixels"], ["x"], to=TensorProto.FLOAT),
         helper.make_node("ReduceMean", ["x", "axes"], ["probabilities"], keepdims=0)],
        "tiny", [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["N", SIZE, SIZE, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    metadata = {"format": METADATA_FORMAT, "classes": json.dumps(["r", "g", "b"]), "image_size": str(SIZE),
                "mean": "[0, 0, 0]", "std": "[1, 1, 1]", "input": INPUT_LAYOUT, "output": "probabilities",
                "opset": "18"}
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_time_runs_warms_up_then_times_each_run():
    calls = []
    times = benchmark.time_runs(lambda: calls.append(1), runs=5, warmup=2)
    assert len(times) == 5 and len(calls) == 7 and all(t >= 0 for t in times)
    synced = []
    wall, cpu = benchmark.timed(lambda: None, sync=lambda: synced.append(1))
    assert synced == [1, 1] and wall >= 0 and cpu >= 0


def test_device_benchmark_reports_every_thread_count_and_batch(tmp_path):
    model = _tiny_model(tmp_path / "tiny.onnx")
    report = benchmark.benchmark_model(model, batch_sizes=(1, 3), runs=4)
    every = benchmark.usable_cpus()
    assert [(r["threads"], r["batch"]) for r in report["latency"]] == [
        (t, b) for t in sorted({1, min(2, every), every}) for b in (1, 3)]
    assert all(r["runs"] == 4 and 0 < r["p50_ms"] <= r["p95_ms"] for r in report["latency"])
    assert report["file_size_mb"] == model.stat().st_size / 1e6 and report["opset"] == "18"
    assert report["quantization"] is None and report["first_run_ms"] > 0
    lines = benchmark.format_benchmark(report).splitlines()
    assert lines[0].startswith(f"model            {model}") and len(lines) == 5 + len(report["latency"])


def test_pytorch_and_each_onnx_model_are_timed_at_each_batch_size(tmp_path):
    class MeanPerChannel(torch.nn.Module):
        def forward(self, pixels):
            return pixels.float().mean(dim=(1, 2))

    models = {"fp32": _tiny_model(tmp_path / "a.onnx"), "int8": _tiny_model(tmp_path / "b.onnx")}
    pixels = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    run, threads = eager_runner(MeanPerChannel())
    table = benchmark.compare_engines(run, threads, models, pixels, (1, 5), runs=2, warmup=1)
    assert threads == torch.get_num_threads()
    assert list(table) == ["pytorch eager", "onnxruntime fp32", "onnxruntime int8"]
    assert all(sorted(times) == [1, 5] and all(ms > 0 for ms in times.values()) for times in table.values())
    lines = benchmark.engines_table(table, threads, 2, 5).splitlines()
    assert f"({threads} thread(s), 2 runs)" in lines[1]
    assert "batch 5" in lines[2] and [line.split("|")[1].strip() for line in lines[4:]] == list(table)


def test_the_module_imports_without_torch():
    """predict.py --benchmark runs on devices without PyTorch."""
    code = "import sys; sys.modules['torch'] = None; import lib.benchmark"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
