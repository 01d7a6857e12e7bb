"""train.py under torchrun: a real 2-process gloo run on the demo data, checked against one process.

resnet18 rather than cnn3: cnn3 has no BatchNorm, and the BatchNorm running statistics are
what drift apart between processes (DDP syncs them only at the start of each forward), so
only a BatchNorm model can show that every shard was evaluated with the checkpoint's weights.
"""
import csv
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from lib import distributed
from lib.checkpoint import load_checkpoint, model_from_checkpoint
from lib.data import Split, load_split
from lib.engine import TrainConfig, fit, predict_probs
from lib.errors import UserError
from lib.metrics import epoch_metrics
from lib.models import build_model

OUTPUTS = {"best.pt", "last.pt", "metrics.csv", "curves.png"}


def torchrun(*args):
    """train.py on 2 gloo processes; torchrun itself gives each one OMP_NUM_THREADS=1."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                           str(REPO / "train.py"), *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def two_process_run(demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    result = torchrun("--data", demo_data, "--task", "target", "--model", "resnet18", "--epochs", "2",
                      "--image-size", "32", "--batch-size", "32", "--amp", "off", "--device", "cpu", "--out", out)
    assert result.returncode == 0, f"torchrun exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    return out, result.stdout


def test_two_processes_train_and_write_one_checkpoint_set(two_process_run):
    out, stdout = two_process_run
    assert stdout.count("DistributedDataParallel over 2 processes (gloo)") == 1, stdout
    # Only rank 0 logs and writes: one line per epoch, and no per-rank or temporary files.
    assert stdout.count("epoch   1/2") == 1 and stdout.count("epoch   2/2") == 1, stdout
    assert {p.name for p in out.iterdir()} == OUTPUTS
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(math.isfinite(float(r[k])) for r in rows for k in ("train_loss", "val_loss"))
    last = load_checkpoint(out / "last.pt")
    torch.manual_seed(0)  # train.py's default --seed: the weights it started from
    start = build_model("resnet18", 2, 32).state_dict()
    moved = [k for k, v in last["state_dict"].items() if v.is_floating_point() and not torch.equal(v, start[k])]
    assert "fc.weight" in moved and "conv1.weight" in moved and "bn1.running_mean" in moved


def test_logged_validation_equals_one_process_evaluation(two_process_run, demo_data):
    out, _ = two_process_run
    last = load_checkpoint(out / "last.pt")
    model = model_from_checkpoint(last)
    val = load_split(demo_data, "val", "target", image_size=last["image_size"])
    probs = predict_probs(model, val.images, last["mean"], last["std"], torch.device("cpu"), amp=False)
    assert len(probs) == len(val)
    expected = epoch_metrics(val.labels, probs)
    logged = list(csv.DictReader(open(out / "metrics.csv")))[-1]
    assert float(logged["val_accuracy"]) == expected["accuracy"]
    assert float(logged["val_auroc"]) == pytest.approx(expected["auroc"], abs=1e-6)
    assert float(logged["val_loss"]) == pytest.approx(expected["loss"], rel=1e-5)
    assert last["metrics"]["val_loss"] == float(logged["val_loss"])


def test_sync_bn_on_cpu_is_a_clear_error(monkeypatch, tmp_path):
    # PyTorch's SyncBatchNorm refuses CPU tensors at the first forward; fit must say so first.
    # A pretended world of 2 reaches that check without launching processes.
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    tiny = Split(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]), ["a", "b"],
                 ["0", "1", "2", "3"])
    describe = {"mean": [0.5] * 3, "std": [0.25] * 3}
    with pytest.raises(UserError, match="--sync-bn: PyTorch's SyncBatchNorm runs only on GPUs"):
        fit(build_model("resnet18", 2, 32), tiny, tiny, describe=describe, config=TrainConfig(sync_bn=True),
            out=tmp_path, device=torch.device("cpu"), seed=0)
    assert not list(tmp_path.iterdir())
