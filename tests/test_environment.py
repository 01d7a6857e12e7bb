"""A bare environment: `docker run --user 4242` has no HOME and no passwd entry for the user, so
Path.home() raises. Every script must still start, and run, with its caches somewhere of the user's."""
import os
import subprocess
import sys

import pytest

from conftest import REPO, SCRIPT_ENV, float32_args

# What a user id without a passwd entry looks like to Python, for this process's own user id.
NO_PASSWD_ENTRY = '''import pwd
def getpwuid(uid):
    raise KeyError(f"getpwuid(): uid not found: {uid}")
pwd.getpwuid = getpwuid
'''


@pytest.fixture
def homeless_env(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_PASSWD_ENTRY)
    (tmp_path / "tmp").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("HOME", "XDG_CACHE_HOME", "MPLCONFIGDIR", "TORCH_HOME")}
    return {**env, **SCRIPT_ENV, "PYTHONPATH": str(site), "TMPDIR": str(tmp_path / "tmp")}


def run_homeless(env, script, *args):
    result = subprocess.run([sys.executable, str(REPO / script), *float32_args(script, args)], cwd=REPO,
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, f"{script} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def test_the_simulation_takes_the_home_folder_away(homeless_env):
    probe = subprocess.run([sys.executable, "-c", "from pathlib import Path; Path.home()"], env=homeless_env,
                           capture_output=True, text=True)
    assert "Could not determine home directory" in probe.stderr


SCRIPTS = ["train", "transfer", "crossval", "evaluate", "explain", "export", "ensemble", "predict"]


def test_help_without_a_home_folder(homeless_env):
    """Every script's --help (its parser, built as `python SCRIPT --help` builds it), in one interpreter."""
    helps = ("import importlib, sys; sys.path.insert(0, '.'); "
             f"[print(importlib.import_module(name).get_args_parser().format_help()) for name in {SCRIPTS!r}]")
    result = subprocess.run([sys.executable, "-c", helps], cwd=REPO, capture_output=True, text=True,
                            env=homeless_env, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("usage:") == len(SCRIPTS)


def test_runs_without_a_home_folder(homeless_env, tmp_path):
    """--data demo and the default pixel cache need a cache folder: a private one in $TMPDIR, with a warning."""
    out = tmp_path / "run"
    run_homeless(homeless_env, "train.py", "--data", "demo", "--task", "target", "--model", "cnn3", "--epochs", "1",
                 "--no-pixel-cache", "--out", out)
    result = run_homeless(homeless_env, "evaluate.py", "--checkpoint", out / "model.pt", "--data", "demo",
                          "--split", "val", "--out", tmp_path / "eval")
    fallback = tmp_path / "tmp" / f"landmark-classification-cache-{os.getuid()}"
    assert f"caching in {fallback}" in result.stderr
    assert (fallback / "pixels").is_dir() and (tmp_path / "eval" / "metrics.json").is_file()
    assert (fallback.stat().st_mode & 0o777) == 0o700, "private to its user"
