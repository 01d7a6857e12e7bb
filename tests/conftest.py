"""Shared fixtures: a private demo dataset and quickly trained checkpoints, made once per session.

The tests run the scripts as a user would (subprocesses), so they check the command lines,
exit codes and files, not only the library; error paths that fail before any real work run the
same parser and main in-process (run_main), which spares an interpreter's start-up each.

Index: one line per test file, named after the feature or lib module it tests (a lib module without
a file of its name is named on the line of the file that tests it; test_docs.py keeps this true).
  test_augment.py           lib/augment.py: augmentation presets, per-image randomness on uint8 batches
  test_balance.py           lib/balance.py: class weights, the balanced sampler, selection on unbalanced val
  test_bench.py             bench/: bench_train.py's GFLOP/s, plot_recipes.py's figure
  test_benchmark.py         lib/benchmark.py: device timing and PyTorch against onnxruntime, importable without torch
  test_checkpoint.py        lib/checkpoint.py: what a checkpoint records, what --resume compares
  test_class_matching.py    classes matched by name in evaluation, explanation, pooling, ensembles
  test_crossval.py          crossval.py, lib/crossval.py: folds, nested selection rules, ensembles, refusals
  test_data.py              lib/data.py, lib/demo.py: image kinds, dataset files as tools write them, resize policy
  test_datasets.py          several --data in one run: classes matched by name, lineage
  test_distill.py           lib/distill.py: --teacher's targets are what the student learns, the record, refusals
  test_distributed.py       lib/distributed.py: torchrun runs against one process, --sync-bn
  test_docs.py              README and docs/: links reach headings, the code map, this index
  test_edge.py              predict.py, lib/edge.py: torch-free inference, one-line errors, EXIF, old onnxruntime
  test_ema.py               the weight average (lib/recipe.py make_ema): bias-corrected, what best.pt holds
  test_ensemble.py          lib/ensemble.py: seed ensembles, ensemble.py, used as one model downstream
  test_environment.py       no home folder (docker run --user): every script still runs
  test_evaluate.py          evaluate.py, lib/evaluation.py, lib/plots.py's report figures: reports, TTA, errors
  test_explain.py           explain.py, lib/cam.py: Grad-CAM maps, where their mass falls, sanity check, grids
  test_export.py            export.py, lib/onnx_export.py: verified export, metadata, opsets 17 and 18
  test_export_sequence.py   lib/export_set.py, lib/image_sets.py: export, verify, gate, replace in one call
  test_flops.py             lib/flops.py: FLOPs per image and per training step, metrics.csv's compute
  test_image_size.py        the default --image-size from the training photos (lib/data.py photo_side)
  test_images.py            lib/images.py: damaged files of every format, extreme shapes
  test_inference.py         lib/inference.py: the uint8 -> input step, predict_probs; who imports the training loop
  test_int8.py              lib/quantize.py, lib/int8_gate.py: int8 per target CPU, the gate, the fallback order
  test_metrics.py           lib/metrics.py: metrics and bootstrap intervals as scikit-learn computes them
  test_mixing.py            lib/mixing.py, lib/loss.py: MixUp and CutMix seeded per step, one loss scale
  test_models.py            lib/models.py: every architecture builds, runs, names its stages; stems; the pipeline
  test_onnx_parity.py       exported models (raw logits, int8) against PyTorch, evaluate.py and predict.py on them
  test_outputs.py           lib/cli.py's output rule, lib/files.py's atomic writes: --overwrite, full disks
  test_pipeline.py          pipeline.sh's logic: which scripts it runs with which flags, its exit codes
  test_pixel_cache.py       lib/pixel_cache.py: read back, invalidated, killed writers, workers, stale files
  test_preprocessing.py     lib/preprocessing.py: the record from checkpoints and ONNX metadata, the defaults in one place
  test_recipe.py            lib/recipe.py's named recipes (RECIPES): each script's defaults
  test_reliability.py       lib/errors.py, lib/cli.py and lib/flags.py: every bad input is one line, resume
  test_schedules.py         lib/recipe.py's schedules: learning rate, progressive resizing
  test_selection.py         lib/selection.py: early stopping, --patience none, the log's notes
  test_small_data_recipe.py the recipe on small data: every family learns, --min-steps, closing warnings
  test_train.py             train.py, lib/engine.py: learning, exact resume, both layouts, divergence
  test_transfer.py          transfer.py, lib/transfer.py: frozen stages, sweeps, errors
  test_unlabelled.py        lib/unlabelled.py: FixMatch, --unlabelled challenge|DIR, refusals
  test_weights.py           lib/weights.py: published weights by name, state_dict files
"""
import importlib
import io
import os
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from unittest import mock

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
# One thread per script and in this process: the tests' models are tiny, and threads fighting
# over two cores cost more (on a busy machine, 40 steps of cnn3 took 0.9 s on one thread and
# 3-18 s on two).
SCRIPT_ENV = {"OMP_NUM_THREADS": "1"}
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Keep the generated demo data out of the user's cache folder."""
    cache = tmp_path_factory.mktemp("cache")
    os.environ["XDG_CACHE_HOME"] = str(cache)
    return cache


# The suite runs in float32 whatever the CPU (bfloat16 is --amp auto's choice only on CPUs with
# fast support), so it behaves the same everywhere; LANDMARK_TEST_AMP=auto runs it with this
# CPU's default instead.
TEST_AMP = os.environ.get("LANDMARK_TEST_AMP", "off")


def float32_args(script, args):
    """train.py, transfer.py and crossval.py get --amp off (TEST_AMP) unless a test chooses --amp itself;
    train.py gets --min-steps 0 (one pass an epoch, as --epochs says) unless a test chooses it: the
    tests' few epochs on a few dozen images would otherwise be stretched to 600 updates."""
    args = [str(a) for a in args]
    if Path(script).name in ("train.py", "transfer.py", "crossval.py") and "--amp" not in args:
        args += ["--amp", TEST_AMP]
    if Path(script).name == "train.py" and "--min-steps" not in args:
        args += ["--min-steps", "0"]
    return args


def run_script(script, *args, check=True, env=None, timeout=600):
    """Run one of the project's scripts; on an unexpected exit code show its output."""
    result = subprocess.run([sys.executable, str(REPO / script), *float32_args(script, args)], cwd=REPO,
                            capture_output=True, text=True, env={**os.environ, **SCRIPT_ENV, **(env or {})},
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def run_main(script, *args, check=True):
    """A script as `python SCRIPT ARGS` runs it (its parser and main under lib.cli.run: one-line
    errors, exit codes), but in this process: for the many error paths where another
    interpreter would add only seconds of start-up. An exception other than the exits cli.run
    makes propagates, failing the test as a traceback would. Returns a CompletedProcess."""
    from lib import cli

    module = importlib.import_module(Path(script).stem)
    argv = [script, *float32_args(script, args)]
    out, err, code = io.StringIO(), io.StringIO(), 0
    with mock.patch.object(sys, "argv", argv), redirect_stdout(out), redirect_stderr(err):
        try:
            cli.run(module.main, module.get_args_parser())
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
    if check and code != 0:
        raise AssertionError(f"{script} exited {code}\n{out.getvalue()}\n{err.getvalue()}")
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def demo_data(private_cache):
    from lib.demo import ensure_demo
    return ensure_demo()


@pytest.fixture(scope="session")
def source_run(demo_data, tmp_path_factory):
    """A small cnn3 trained on the demo source task."""
    out = tmp_path_factory.mktemp("source")
    run_script("train.py", "--data", demo_data, "--task", "source", "--model", "cnn3",
               "--epochs", "3", "--out", out, "--overwrite")
    return out


@pytest.fixture(scope="session")
def target_run(demo_data, tmp_path_factory):
    """A small cnn3 trained on the demo target task. 80 images are 2 steps an epoch: without a
    warm-up epoch or a weight average the 6 steps make a model whose outputs depend on its input,
    which the export tests need (an int8 gate cannot fail on a constant model)."""
    out = tmp_path_factory.mktemp("target")
    run_script("train.py", "--data", demo_data, "--task", "target", "--model", "cnn3",
               "--epochs", "3", "--warmup-epochs", "0", "--ema", "0", "--out", out, "--overwrite")
    return out


@pytest.fixture(scope="module")
def tiny_imagefolder(demo_data, tmp_path_factory):
    """8 train and 4 val images of the demo target task, as an ImageFolder: enough for a few
    fastnet steps at large sizes."""
    from lib.data import load_split

    root = tmp_path_factory.mktemp("tiny")
    for split, count in (("train", 8), ("val", 4)):
        part = load_split(demo_data, split, "target")
        for label in (0, 1):
            names = [n for n, l in zip(part.filenames, part.labels.tolist()) if l == label][:count // 2]
            (root / split / part.classes[label]).mkdir(parents=True)
            for name in names:
                shutil.copy(demo_data / "images" / name, root / split / part.classes[label] / name)
    return root


@pytest.fixture(scope="session")
def cnn3_export(target_run, tmp_path_factory):
    """target_run's best.pt exported with --quantize int8 (the default x86 target): (OUT, stdout)."""
    out = tmp_path_factory.mktemp("cnn3_onnx") / "model.onnx"
    result = run_script("export.py", "--checkpoint", target_run / "best.pt", "--out", out, "--quantize", "int8")
    return out, result.stdout
