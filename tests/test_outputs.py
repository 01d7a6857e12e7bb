"""The output rule of every script: nothing already written is replaced without --overwrite, an
--out that cannot be made is one line, and a full disk is one line that leaves earlier outputs whole."""
import errno
import hashlib
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, SCRIPT_ENV, float32_args, run_main
from lib.errors import UserError
from lib.files import atomic_write
from test_reliability import assert_clean_error


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_atomic_write_on_a_full_disk_keeps_the_earlier_file(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("the earlier table")

    def full_disk(tmp):
        with open(tmp, "w") as f:
            f.write("half a ")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(UserError, match="cannot write .*metrics.csv: No space left on device"):
        atomic_write(path, full_disk)
    assert path.read_text() == "the earlier table"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"], "the temporary file is removed"


@pytest.mark.parametrize("script", ["train.py", "transfer.py"])
def test_a_single_run_never_replaces_an_ensemble(script, source_run, demo_data, tmp_path):
    """transfer.py --seeds (and ensemble.py --out OUT/model.pt) leave OUT/model.pt without best.pt
    or last.pt beside it: a single run into OUT would replace it."""
    out = tmp_path / "ensemble"
    (out / "seed-0").mkdir(parents=True)
    shutil.copy(source_run / "model.pt", out / "model.pt")
    before = digest(out / "model.pt")
    args = {"train.py": ["--data", demo_data, "--task", "source", "--model", "cnn3"],
            "transfer.py": ["--source", source_run / "model.pt", "--data", demo_data, "--task", "target"]}[script]
    result = run_main(script, *args, "--epochs", "1", "--out", out, check=False)
    assert_clean_error(result, "model.pt", "--overwrite")
    assert digest(out / "model.pt") == before


def through_a_file(tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    return blocker / "out"


OUT_ARGS = {
    "train.py": ["--data", "{data}", "--task", "source", "--model", "cnn3", "--epochs", "1", "--out", "{out}"],
    "transfer.py": ["--source", "{ckpt}", "--data", "{data}", "--task", "target", "--epochs", "1", "--out", "{out}"],
    "crossval.py": ["--source", "{ckpt}", "--data", "{data}", "--task", "target", "--epochs", "1", "--out", "{out}"],
    "evaluate.py": ["--checkpoint", "{ckpt}", "--data", "{data}", "--split", "val", "--out", "{out}"],
    "evaluate.py --json": ["--checkpoint", "{ckpt}", "--data", "{data}", "--split", "val", "--out", "{ok}",
                           "--json", "{out}/metrics.json"],
    "explain.py": ["--checkpoint", "{ckpt}", "--data", "{data}", "--num-images", "2", "--out", "{out}"],
    "export.py": ["--checkpoint", "{ckpt}", "--synthetic-verify", "--out", "{out}/model.onnx"],
    "ensemble.py": ["{ckpt}", "{last}", "--out", "{out}/ensemble.pt"],
}


def out_args(name, ckpt_folder, demo_data, out, tmp_path):
    return [a.format(data=demo_data, ckpt=ckpt_folder / "model.pt", last=ckpt_folder / "last.pt", out=out,
                     ok=tmp_path / "ok") for a in OUT_ARGS[name]]


@pytest.mark.parametrize("name", list(OUT_ARGS))
def test_an_out_through_a_file_is_one_line(name, source_run, demo_data, tmp_path):
    out = through_a_file(tmp_path)
    result = run_main(name.split()[0], *out_args(name, source_run, demo_data, out, tmp_path), check=False)
    assert_clean_error(result, "notes.txt is a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="permissions do not stop root")
@pytest.mark.parametrize("name", ["train.py", "export.py", "ensemble.py"])
def test_an_out_without_permission_is_one_line(name, source_run, demo_data, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    result = run_main(name, *out_args(name, source_run, demo_data, locked / "out", tmp_path), check=False)
    assert_clean_error(result, "Permission denied")
    if name == "train.py":  # the folder exists: refused before training, not at the first checkpoint
        result = run_main(name, *out_args(name, source_run, demo_data, locked, tmp_path), check=False)
        assert_clean_error(result, "no permission to write")


# A real full file system, without root: the kernel refuses to grow any file past RLIMIT_FSIZE
# (EFBIG, "File too large", once SIGXFSZ is ignored), in the scripts' own writes and in torch's,
# matplotlib's and onnx's alike. A small Python sets the limit and execs the script (a pytest
# process with threads must not use preexec_fn; see test_reliability.WITH_DEFAULT_SIGINT).
LIMIT = 4096
WITH_FILE_SIZE_LIMIT = ["-c", "import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                              f"resource.setrlimit(resource.RLIMIT_FSIZE, ({LIMIT}, {LIMIT})); "
                              "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"]


def run_on_a_full_disk(script, *args):
    return subprocess.run([sys.executable, *WITH_FILE_SIZE_LIMIT, str(REPO / script), *float32_args(script, args)],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, **SCRIPT_ENV}, timeout=600)


def outputs_of(folder):
    return {p.relative_to(folder): digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def copy_of(folder, tmp_path):
    out = tmp_path / folder.name
    shutil.copytree(folder, out)
    return out


@pytest.mark.parametrize("script", ["train.py", "evaluate.py", "export.py"])
def test_a_full_disk_is_one_line_and_earlier_outputs_stay_whole(script, source_run, demo_data, tmp_path):
    """Each script runs --overwrite over its own earlier outputs (checkpoints and plots are all
    larger than the limit) and must fail in one line, leaving every earlier file as it was."""
    ckpt = source_run / "model.pt"
    if script == "train.py":
        out = copy_of(source_run, tmp_path)
        args = ["--data", demo_data, "--task", "source", "--model", "cnn3", "--epochs", "1", "--out", out]
    elif script == "evaluate.py":
        out = tmp_path / "eval"
        args = ["--checkpoint", ckpt, "--data", demo_data, "--split", "val", "--out", out]
        run_main(script, *args)
    else:
        out = tmp_path / "onnx"
        args = ["--checkpoint", ckpt, "--synthetic-verify", "--out", out / "model.onnx"]
        run_main(script, *args)
    before = outputs_of(out)
    assert any(os.path.getsize(out / name) > LIMIT for name in before)
    result = run_on_a_full_disk(script, *args, "--overwrite")
    assert_clean_error(result, "File too large")
    after = outputs_of(out)
    assert after.keys() == before.keys(), "no output lost, no temporary file left"
    changed = [name for name in before if after[name] != before[name]]
    assert all(os.path.getsize(out / name) <= LIMIT for name in changed), f"{changed} half-written"
