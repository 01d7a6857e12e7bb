"""Timing inference: one clock for predict.py --benchmark, export.py --benchmark and bench/.

Every figure is wall-clock time after untimed warm-up runs (the first run allocates and picks
kernels, so it is slow); callers report medians or percentiles, never a mean a stray slow run
would move. torch-free at import (predict.py uses this module on devices without PyTorch):
compare_engines times PyTorch through a callable the caller builds (lib.export_set.eager_runner).
"""
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from lib.edge import CPU, OnnxClassifier, make_session


def usable_cpus():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def timed(run, sync=None):
    """(wall-clock seconds, this process's CPU seconds) that run() takes. sync (e.g. torch.cuda.synchronize)
    is called before and after, so that work queued on an accelerator is counted where it runs."""
    if sync:
        sync()
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    if sync:
        sync()
    return time.perf_counter() - wall, time.process_time() - cpu


def time_runs(run, runs, warmup=1):
    """Wall-clock milliseconds of each of `runs` calls of run(), after `warmup` untimed calls."""
    for _ in range(warmup):
        run()
    return [timed(run)[0] * 1000 for _ in range(runs)]


# --- a model on its device (predict.py --benchmark) ---------------------------------------------

def benchmark_model(path, provider=CPU, batch_sizes=(1, 64), runs=30, seed=0):
    """What a device owner asks first: how big, how long to start, how fast at 1, 2 and all threads.

    Session creation and first-run times are for all threads (a fresh session, the first run
    unwarmed); latencies are p50/p95 over `runs` timed runs after one warm-up run, on random pixels.
    """
    path = Path(path)
    threads = sorted({min(count, usable_cpus()) for count in (1, 2, usable_cpus())})
    started = time.perf_counter()
    classifier = OnnxClassifier(path, provider, threads[-1])
    report = {"model": str(path), "file_size_mb": path.stat().st_size / 1e6,
              "onnxruntime": ort.__version__, "provider": provider, "cpus": usable_cpus(),
              "opset": classifier.metadata.get("opset"),
              "quantization": json.loads(classifier.metadata.get("quantization", "null")),
              "session_create_ms": (time.perf_counter() - started) * 1000}
    rng = np.random.default_rng(seed)
    size = classifier.preprocessing.image_size
    batches = {b: rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8)
               for b in batch_sizes}
    report["first_run_ms"] = time_runs(lambda: classifier.run(batches[batch_sizes[0]]), 1, warmup=0)[0]
    report["latency"] = []
    for count in threads:
        session = classifier if count == threads[-1] else OnnxClassifier(path, provider, count)
        for batch, pixels in batches.items():
            times = time_runs(lambda: session.run(pixels), runs)
            report["latency"].append({"threads": count, "batch": batch, "runs": runs,
                                      "p50_ms": float(np.percentile(times, 50)),
                                      "p95_ms": float(np.percentile(times, 95))})
    return report


def format_benchmark(report):
    lines = [f"model            {report['model']} ({report['file_size_mb']:.2f} MB, opset {report['opset']})",
             f"runtime          onnxruntime {report['onnxruntime']}, {report['provider']}, "
             f"{report['cpus']} CPU(s)",
             f"session created  {report['session_create_ms']:.1f} ms",
             f"first run        {report['first_run_ms']:.1f} ms (batch {report['latency'][0]['batch']}, unwarmed)",
             f"{'threads':>7} {'batch':>6} {'p50 ms':>9} {'p95 ms':>9} {'images/s':>9}"]
    for row in report["latency"]:
        lines.append(f"{row['threads']:>7} {row['batch']:>6} {row['p50_ms']:>9.2f} {row['p95_ms']:>9.2f} "
                     f"{row['batch'] / row['p50_ms'] * 1000:>9.0f}")
    return "\n".join(lines)


# --- PyTorch against onnxruntime on this machine (export.py --benchmark) ------------------------

def compare_engines(pytorch_run, threads, model_paths, pixels, batch_sizes=(1, 64), runs=20, warmup=3):
    """{engine: {batch size: median ms}}: PyTorch eager (`pytorch_run`, a callable on uint8 (N, H, W, 3)
    numpy pixels, e.g. lib.export_set.eager_runner's) against each ONNX model in model_paths
    ({name: path}), on `pixels` repeated or cut to each batch size. onnxruntime gets `threads`
    (torch's), so the comparison is like for like; this module stays torch-free.
    """
    batches = {b: np.ascontiguousarray(np.resize(pixels, (b, *pixels.shape[1:]))) for b in batch_sizes}
    table = {"pytorch eager": {b: statistics.median(time_runs(lambda x=x: pytorch_run(x), runs, warmup))
                               for b, x in batches.items()}}
    for name, path in model_paths.items():
        session = make_session(path, threads=threads)
        feed = session.get_inputs()[0].name
        table[f"onnxruntime {name}"] = {
            b: statistics.median(time_runs(lambda x=x: session.run(None, {feed: x}), runs, warmup))
            for b, x in batches.items()}
    return table


def engines_table(table, threads, runs, big_batch=64):
    """compare_engines()'s latencies as a Markdown table, with each engine's batch-1 speed-up over eager."""
    eager = table["pytorch eager"][1]
    lines = [f"\nmedian latency on this CPU, ms ({threads} thread(s), {runs} runs)",
             f"| {'engine':<20} | {'batch 1':>9} | {'batch ' + str(big_batch):>9} | {'b1 speed-up':>11} |",
             f"|{'-' * 22}|{'-' * 11}:|{'-' * 11}:|{'-' * 12}:|"]
    lines += [f"| {name:<20} | {times[1]:>9.2f} | {times[big_batch]:>9.1f} | {eager / times[1]:>10.1f}x |"
              for name, times in table.items()]
    return "\n".join(lines)
