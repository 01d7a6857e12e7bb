"""Shared fixtures: a private demo dataset and quickly trained checkpoints, made once per session.

The tests run the scripts as a user would (subprocesses), so they check the command lines,
exit codes and files, not only the library; error paths that fail before any real work run the
same parser and main in-process (run_main), which spares an interpreter's start-up each.
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
