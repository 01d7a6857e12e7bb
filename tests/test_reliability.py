"""Bad input, interruptions and untrusted files, through the scripts' command lines.

Every bad input must end with exit code 2 and ONE line on stderr that names the culprit;
never a traceback, never a silently wrong answer. The error paths run in-process (run_main:
the same parser, main and cli.run); interruptions need real processes.
"""
import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, SCRIPT_ENV, float32_args, run_main, run_script
from lib.checkpoint import FORMAT, load_checkpoint, without_training_state
from lib.cli import RUN_OUTPUTS, prepare_out_dir
from lib.data import load_split
from lib.demo import CSV_COLUMNS
from lib.evaluation import load_predictor
from lib.files import atomic_write, remove_stale_temporaries


def assert_clean_error(result, *culprits):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, f"exit code {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, f"expected one line, got:\n{result.stderr}"
    for culprit in culprits:
        assert str(culprit) in lines[0], f"{culprit!r} not named in: {lines[0]}"


def copy_dataset(demo_data, dest, rows=None, task="target"):
    """A small copy of the demo data's target task (val and train), optionally with edited rows."""
    (dest / "images").mkdir(parents=True)
    with open(demo_data / "landmarks.csv") as f:
        kept = [r for r in csv.DictReader(f) if r["task"] == task and r["partition"] in ("train", "val")]
    kept = kept[::4]
    for r in kept:
        shutil.copy(demo_data / "images" / r["filename"], dest / "images" / r["filename"])
    kept = rows(kept) if rows else kept
    with open(dest / "landmarks.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(kept)
    return dest


def train(data, out, *extra, task="target"):
    return run_main("train.py", "--data", data, "--task", task, "--model", "cnn3", "--epochs", "1",
                    "--out", out, *extra, check=False)


# --- data -------------------------------------------------------------------------------------

def test_missing_data_path(tmp_path):
    assert_clean_error(train(tmp_path / "nowhere", tmp_path / "out"), "nowhere")


def test_folder_of_neither_layout(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_clean_error(train(tmp_path / "empty", tmp_path / "out"), "neither layout")


def test_csv_missing_column(demo_data, tmp_path):
    data = copy_dataset(demo_data, tmp_path / "d")
    text = (data / "landmarks.csv").read_text().replace(",numeric_label", "")
    (data / "landmarks.csv").write_text(text)
    assert_clean_error(train(data, tmp_path / "out"), "landmarks.csv", "numeric_label")


def test_empty_split(demo_data, tmp_path):
    data = copy_dataset(demo_data, tmp_path / "d", rows=lambda rows: [r for r in rows if r["partition"] != "val"])
    assert_clean_error(train(data, tmp_path / "out"), "no images", "val")


def test_label_outside_class_list(demo_data, tmp_path):
    def relabel(rows):
        rows[0] = {**rows[0], "numeric_label": "7"}
        return rows
    data = copy_dataset(demo_data, tmp_path / "d", rows=relabel)
    assert_clean_error(train(data, tmp_path / "out"), "numeric_label")


def test_split_with_one_class(demo_data, tmp_path):
    data = copy_dataset(demo_data, tmp_path / "d",
                        rows=lambda rows: [r for r in rows if r["partition"] == "train" or r["numeric_label"] == "0"])
    assert_clean_error(train(data, tmp_path / "out"), "val split", "two classes")


@pytest.mark.parametrize("damage", ["truncated", "zero bytes", "not an image"])
def test_bad_image_is_named(demo_data, tmp_path, damage):
    data = copy_dataset(demo_data, tmp_path / "d")
    with open(data / "landmarks.csv") as f:
        victim = data / "images" / next(csv.DictReader(f))["filename"]
    content = victim.read_bytes()
    victim.write_bytes({"truncated": content[: len(content) // 2], "zero bytes": b"",
                        "not an image": b"hello, I am text"}[damage])
    assert_clean_error(train(data, tmp_path / "out"), victim.name)
    if damage == "truncated":
        skipped = train(data, tmp_path / "skipped", "--skip-bad-images")
        assert skipped.returncode == 0, skipped.stderr
        assert "skipped 1 unreadable image" in skipped.stderr


def test_explain_skips_bad_image_files_when_asked(target_run, demo_data, tmp_path):
    good = sorted((demo_data / "images").glob("*.png"))[:2]
    bad = tmp_path / "broken.png"
    bad.write_bytes(good[0].read_bytes()[:100])
    args = ["--checkpoint", target_run / "model.pt", "--images", good[0], bad, good[1]]
    assert_clean_error(run_main("explain.py", *args, "--out", tmp_path / "stop", check=False),
                       "broken.png", "--skip-bad-images")
    result = run_main("explain.py", *args, "--skip-bad-images", "--out", tmp_path / "skip")
    assert "skipped" in result.stderr and "broken.png" in result.stderr
    assert len(list((tmp_path / "skip" / "images").glob("*.png"))) == 2


@pytest.mark.parametrize("name", ["../escape.png", "/etc/passwd"])
def test_filename_escaping_images_folder(demo_data, tmp_path, name):
    def escape(rows):
        rows[0] = {**rows[0], "filename": name}
        return rows
    data = copy_dataset(demo_data, tmp_path / "d", rows=escape)
    assert_clean_error(train(data, tmp_path / "out"), name, "outside")


# --- flags ------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value", [("--epochs", "-3"), ("--lr", "0"), ("--model", "vgg99"),
                                         ("--augment", "extreme"), ("--batch-size", "zero")])
def test_invalid_option_values(demo_data, tmp_path, flag, value):
    result = run_main("train.py", "--data", demo_data, "--task", "target", "--out", tmp_path / "o", flag, value,
                      check=False)
    assert_clean_error(result, flag)


@pytest.mark.parametrize("args, culprits", [
    # fastnet's last max-pool has nothing left to pool below 15 px (found by a trial forward pass).
    (["--min-size", "11"], ["--min-size 11", "fastnet", "11 px", "use --min-size 15 or more"]),
    (["--min-size", "4"], ["--min-size 4", "4 px", "use --min-size 15 or more"]),
    # At 16 px fastnet's last BatchNorm sees a 1x1 map: one value per channel for one image.
    (["--min-size", "16", "--batch-size", "1"], ["--batch-size 1", "one value per channel", "--batch-size 2"]),
    (["--model", "resnet18", "--stem", "stock", "--image-size", "32", "--min-size", "0", "--batch-size", "1"],
     ["--batch-size 1", "resnet18"]),
    (["--image-size", "8", "--min-size", "0"], ["--image-size 8", "fastnet cannot run on 8 px images"]),
])
def test_settings_the_network_cannot_train_with_are_refused_before_training(demo_data, tmp_path, args, culprits):
    result = run_main("train.py", "--data", demo_data, "--task", "target", "--epochs", "2", *args,
                      "--out", tmp_path / "o", check=False)
    assert_clean_error(result, *culprits)
    assert not list((tmp_path / "o").iterdir()), "nothing written"


def test_batches_of_one_train_where_batchnorm_sees_more_than_one_value(demo_data, tmp_path):
    # fastnet at 32 px still has a 2x2 map at its last BatchNorm: batches of one image can train.
    result = train(demo_data, tmp_path / "o", "--model", "fastnet", "--batch-size", "1", "--image-size", "32",
                   "--min-size", "0")
    assert result.returncode == 0, result.stderr


# --- checkpoints ------------------------------------------------------------------------------

class RunsCode:
    """Unpickling this would create a file: the attack a weights_only load must refuse."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def malicious_checkpoint(path, marker):
    torch.save({"format": "landmark-classification/1", "payload": RunsCode(marker)}, path)
    return path


def bad_checkpoint(case, tmp_path, source_run):
    path = tmp_path / f"{case.replace(' ', '_')}.pt"
    if case == "truncated":
        data = (source_run / "best.pt").read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif case == "not a checkpoint":
        path.write_text("just text")
    elif case == "foreign dict":
        torch.save({"weights": torch.zeros(3)}, path)
    return path


def test_malicious_pickle_is_refused_and_runs_nothing(source_run, tmp_path, demo_data):
    marker = tmp_path / "pwned"
    evil = malicious_checkpoint(tmp_path / "evil.pt", marker)
    result = run_main("evaluate.py", "--checkpoint", evil, "--data", demo_data, "--task", "source",
                      "--split", "val", "--out", tmp_path / "eval", check=False)
    assert_clean_error(result, "evil.pt", "refused")
    assert not marker.exists(), "loading the checkpoint executed code"


@pytest.mark.parametrize("case", ["missing", "truncated", "not a checkpoint", "foreign dict"])
def test_bad_checkpoint_for_evaluate(source_run, tmp_path, demo_data, case):
    path = bad_checkpoint(case, tmp_path, source_run)
    result = run_main("evaluate.py", "--checkpoint", path, "--data", demo_data, "--task", "source",
                      "--split", "val", "--out", tmp_path / "eval", check=False)
    assert_clean_error(result, path.name)


def test_checkpoint_of_another_architecture(source_run, tmp_path, demo_data):
    checkpoint = torch.load(source_run / "best.pt", weights_only=True)
    mislabelled = tmp_path / "mislabelled.pt"
    torch.save({**checkpoint, "model": "resnet18"}, mislabelled)
    result = run_main("evaluate.py", "--checkpoint", mislabelled, "--data", demo_data, "--task", "source",
                      "--split", "val", "--out", tmp_path / "eval", check=False)
    assert_clean_error(result, "mislabelled.pt", "resnet18")


NOT_A_CHECKPOINT = {
    "transfer.py": ["--source", "{ckpt}", "--data", "{data}", "--task", "target", "--out", "{out}"],
    "explain.py": ["--checkpoint", "{ckpt}", "--data", "{data}", "--task", "target", "--out", "{out}"],
    "export.py": ["--checkpoint", "{ckpt}", "--out", "{out}/model.onnx"],
}


@pytest.mark.parametrize("script", list(NOT_A_CHECKPOINT))
def test_every_script_refuses_a_file_that_is_not_a_checkpoint(script, tmp_path, demo_data):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    args = [a.format(ckpt=text, data=demo_data, out=tmp_path / "out") for a in NOT_A_CHECKPOINT[script]]
    assert_clean_error(run_main(script, *args, check=False), "notes.pt")


@pytest.mark.parametrize("script, args, flag", [
    ("transfer.py", ["--source", "{source}", "--freeze", "9"], "--freeze"),
    ("explain.py", ["--checkpoint", "{source}", "--method", "telepathy"], "--method"),
    ("explain.py", ["--checkpoint", "{source}", "--layer", "layer99"], "layer99"),
    ("evaluate.py", ["--checkpoint", "{source}", "--split", "everything"], "--split"),
])
def test_invalid_option_values_of_other_scripts(script, args, flag, source_run, demo_data, tmp_path):
    args = [a.format(source=source_run / "best.pt") for a in args]
    result = run_main(script, *args, "--data", demo_data, "--task", "source", "--out", tmp_path / "o",
                      check=False)
    assert_clean_error(result, flag)


# --- interruptions and outputs ----------------------------------------------------------------

def test_existing_output_is_not_overwritten(source_run, demo_data):
    before = (source_run / "best.pt").read_bytes()
    result = train(demo_data, source_run, task="source")
    assert_clean_error(result, "--overwrite")
    assert (source_run / "best.pt").read_bytes() == before


# resnet18 for its BatchNorm buffers, at 32 px to keep it cheap: what is resumed (weights,
# buffers, optimizer, scheduler, random state) does not depend on the size.
# The recipe's moving parts all cross the interruption: the weight average (default), epochs at
# growing sizes (16, then 32 px) and validation every 2 epochs (default), so epoch 1 is not validated.
INTERRUPTED = ["--task", "target", "--model", "resnet18", "--image-size", "32", "--min-size", "16", "--epochs", "3",
               "--batch-size", "32", "--augment", "strong"]


# Run a Python command with SIGINT at its default, whatever this process inherited: a shell
# starts background jobs with SIGINT ignored, an ignored signal stays ignored across exec, and
# Python installs its Ctrl-C handler only when SIGINT is not ignored at start-up. A small Python
# resets it and execs the real command (same pid); preexec_fn would too, but is not safe in a
# process with threads, as pytest's is once torch has run.
WITH_DEFAULT_SIGINT = ["-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                             "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"]


@pytest.fixture(scope="module")
def uninterrupted_run(demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    run_script("train.py", "--data", demo_data, *INTERRUPTED, "--out", out, "--overwrite")
    return out


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run):
    return torch.load(uninterrupted_run / "last.pt", weights_only=True)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_interrupted_run_resumes_to_the_same_weights(demo_data, tmp_path, uninterrupted, sig):
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, *WITH_DEFAULT_SIGINT, str(REPO / "train.py"),
                                *float32_args("train.py", ["--data", demo_data, *INTERRUPTED, "--out", out])],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, **SCRIPT_ENV})
    deadline = time.time() + 300
    while not (out / "last.pt").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    stopped_at = torch.load(out / "last.pt", weights_only=True)["epoch"]
    assert stopped_at < 3, "the run ended before the signal; the test proves nothing"
    if sig == signal.SIGINT:
        assert process.returncode == 130, stderr
        assert "--resume" in stderr and "Traceback" not in stderr
    run_script("train.py", "--data", demo_data, *INTERRUPTED, "--out", out, "--resume")
    resumed = torch.load(out / "last.pt", weights_only=True)
    assert resumed["epoch"] == 3
    for name, tensor in uninterrupted["state_dict"].items():  # the average
        assert torch.equal(tensor, resumed["state_dict"][name]), name
    for name, tensor in uninterrupted["training"]["raw_state_dict"].items():  # the weights it averages
        assert torch.equal(tensor, resumed["training"]["raw_state_dict"][name]), name
    assert [r["val_loss"] for r in resumed["history"]] == [r["val_loss"] for r in uninterrupted["history"]]
    assert [r["size"] for r in resumed["history"]] == [16, 32, 32] and resumed["history"][0]["val_loss"] is None


def test_resume_with_other_settings_is_refused_in_one_line(source_run, uninterrupted_run, demo_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(source_run / "last.pt", out / "last.pt")
    before = (out / "last.pt").read_bytes()
    result = run_main("train.py", "--data", demo_data, "--task", "target", "--model", "resnet18",
                      "--image-size", "32", "--out", out, "--resume", check=False)
    assert_clean_error(result, "--resume", "last.pt", "--model, --stem, --image-size, --task", "--model cnn3")
    assert "--data" not in result.stderr, "the data folder is the same"
    assert (out / "last.pt").read_bytes() == before
    # The same flags on another copy of the data: only --data is named.
    other = copy_dataset(demo_data, tmp_path / "other", task="source")
    result = run_main("train.py", "--data", other, "--task", "source", "--model", "cnn3", "--epochs", "3",
                      "--out", out, "--resume", check=False)
    assert_clean_error(result, "different --data (it had --data ")
    assert (out / "last.pt").read_bytes() == before
    # Whatever moves the network, the per-step schedule, the sizes or the weight average, one flag each:
    # a resnet18 run (no max-pool) resumed with the stock stem, without the average, ...
    shutil.copy(uninterrupted_run / "last.pt", out / "last.pt")
    for changed, had in [(["--stem", "stock"], "--stem no-maxpool"), (["--ema", "0"], "--ema 0.99"),
                         (["--batch-size", "16"], "--batch-size 32"), (["--epochs", "4"], "--epochs 3"),
                         (["--min-size", "0"], "--min-size 16"), (["--warmup-epochs", "0"], "--warmup-epochs 1.0"),
                         (["--lr", "1e-3"], "--lr 0.002"), (["--scheduler", "linear"], "--scheduler cosine"),
                         (["--select-metric", "loss"], "--select-metric balanced_accuracy"), (["--seed", "1"], "--seed 0")]:
        flag = changed[0]
        result = run_main("train.py", "--data", demo_data, *INTERRUPTED, *changed, "--out", out, "--resume",
                          check=False)
        assert_clean_error(result, f"belongs to a run with different {flag} (it had {had})")
    # ... and what may change: patience, validation interval, --select.
    result = run_main("train.py", "--data", demo_data, *INTERRUPTED, "--patience", "2", "--eval-every", "1",
                      "--select", "last", "--out", out, "--resume")
    assert "resuming" in result.stdout and load_checkpoint(out / "model.pt")["selection"]["select"] == "last"


def test_checkpoints_of_the_previous_format_predict_and_transfer_but_do_not_resume(source_run, demo_data, tmp_path):
    # What the previous release wrote: format 1, optimizer/scheduler state of CosineAnnealingLR
    # and the averaged weights' keys at the top level, no `training` entry.
    current = load_checkpoint(source_run / "last.pt")
    old = {**without_training_state(current), "format": "landmark-classification/1", "history": current["history"],
           "optimizer": current["training"]["optimizer"], "scheduler": {"T_max": 3, "last_epoch": 3},
           "best_score": [0.5, 0.5, -1.0], "stale_epochs": 0, "rng": current["training"]["rng"]}
    out = tmp_path / "run"
    out.mkdir()
    torch.save(old, out / "last.pt")
    result = run_main("train.py", "--data", demo_data, "--task", "source", "--model", "cnn3", "--epochs", "3",
                      "--out", out, "--resume", check=False)
    assert_clean_error(result, "--resume", "last.pt", "earlier version", "landmark-classification/1")
    torch.save({k: v for k, v in old.items() if k not in ("optimizer", "scheduler", "history", "best_score",
                                                           "stale_epochs", "rng")}, tmp_path / "best.pt")
    val = load_split(demo_data, "val", "source")
    assert load_predictor(tmp_path / "best.pt", torch.device("cpu")).predict(val.images).shape == (len(val), 8)
    run_main("transfer.py", "--source", tmp_path / "best.pt", "--data", demo_data, "--task", "target",
             "--epochs", "1", "--out", tmp_path / "target")
    assert load_checkpoint(tmp_path / "target" / "model.pt")["format"] == FORMAT


def test_temporary_files_of_killed_writes_are_removed_at_the_next_start(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    # A write killed with SIGKILL half-way leaves its temporary file; while the writer lives,
    # the file is locked and no one may remove it.
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from lib.files import atomic_write; "
        "atomic_write(Path(sys.argv[1]) / 'last.pt', lambda tmp: (Path(tmp).write_text('half'), time.sleep(60)))"),
        str(out)], cwd=REPO)
    # Wait for the content, written after the lock is taken (mkstemp creates the file just before).
    deadline = time.time() + 60
    while (not any(p.read_text() == "half" for p in out.glob(".last.pt.*.tmp"))
           and writer.poll() is None and time.time() < deadline):
        time.sleep(0.02)
    [left] = list(out.glob(".last.pt.*.tmp"))
    assert remove_stale_temporaries(out) == [] and left.exists(), "removed a file being written"
    writer.kill()
    writer.wait(timeout=30)
    assert left.exists(), "SIGKILL leaves the temporary file behind"
    stale = out / ".metrics.csv.abcd_123.tmp"
    stale.write_text("half a table")
    not_ours = [out / "notes.tmp", out / ".notes.tmp", out / "last.pt.tmp", out / ".last.pt.toolongname.tmp"]
    for path in not_ours:
        path.write_text("the user's")
    prepare_out_dir(out, ("best.pt",), resume=False)
    assert not left.exists() and not stale.exists()
    assert all(path.exists() for path in not_ours), "only atomic_write's own temporary names are removed"

    def write_while_a_run_starts(tmp):
        assert prepare_out_dir(out, RUN_OUTPUTS, overwrite=True) == out and Path(tmp).exists()
        Path(tmp).write_text("new")

    atomic_write(out / "metrics.csv", write_while_a_run_starts)
    assert (out / "metrics.csv").read_text() == "new"
