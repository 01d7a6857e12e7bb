"""train.py and transfer.py under torchrun: real 2-process gloo runs on the demo data, checked
against one process; a split smaller than the world; divergence on one process; --sync-bn.

resnet18 rather than cnn3 for train.py: cnn3 has no BatchNorm, and the BatchNorm running
statistics are what drift apart between processes (DDP syncs them only at the start of each
forward), so only a BatchNorm model can show that every shard was evaluated with the
checkpoint's weights. The validation split has an odd number of images, so the shards differ
in size and any padding or repeat would change the metrics.
"""
import copy
import csv
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, float32_args
from lib import distributed
from lib.checkpoint import build_from_checkpoint, load_checkpoint
from lib.data import Split, load_split
from lib.demo import CSV_COLUMNS, CSV_NAME
from lib.engine import ComputeCounter, convert_sync_bn, fit, set_train_mode
from lib.errors import UserError
from lib.inference import predict_probs
from lib.metrics import epoch_metrics
from lib.models import build_model
from lib.recipe import TrainConfig
from lib.transfer import freeze_stages

OUTPUTS = {"model.pt", "best.pt", "last.pt", "metrics.csv", "curves.png"}


def torchrun(script, *args):
    """A script on 2 gloo processes; torchrun itself gives each one OMP_NUM_THREADS=1."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                           str(REPO / script), *float32_args(script, args)],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def odd_data(demo_data, tmp_path_factory):
    """The demo data's target task with one val image fewer: 59, an odd number (images linked)."""
    root = tmp_path_factory.mktemp("odd")
    (root / "images").symlink_to(demo_data / "images")
    with open(demo_data / CSV_NAME, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["task"] == "target"]
    rows.remove(next(r for r in rows if r["partition"] == "val"))
    with open(root / CSV_NAME, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return root


def assert_logged_validation_is_one_process_evaluation(out, data):
    last = load_checkpoint(out / "last.pt")
    model = build_from_checkpoint(last)
    val = load_split(data, "val", "target", image_size=last["image_size"])
    assert len(val) % 2 == 1, "an even split would not show padding"
    probs = predict_probs(model, val.images, last["mean"], last["std"], torch.device("cpu"))
    assert len(probs) == len(val)
    expected = epoch_metrics(val.labels, probs)
    logged = list(csv.DictReader(open(out / "metrics.csv")))[-1]
    assert float(logged["val_accuracy"]) == expected["accuracy"]
    assert float(logged["val_auroc"]) == pytest.approx(expected["auroc"], abs=1e-6)
    assert float(logged["val_loss"]) == pytest.approx(expected["loss"], rel=1e-5)
    assert last["metrics"]["val_loss"] == float(logged["val_loss"])


@pytest.fixture(scope="module")
def two_process_run(odd_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    result = torchrun("train.py", "--data", odd_data, "--task", "target", "--model", "resnet18", "--epochs", "2",
                      "--image-size", "32", "--batch-size", "32", "--device", "cpu", "--out", out)
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
    assert all(math.isfinite(float(r["train_loss"])) for r in rows)
    # Validation every 2 epochs (the default) and after the last: epoch 2 only.
    assert [r["val_loss"] != "" for r in rows] == [False, True] and math.isfinite(float(rows[1]["val_loss"]))
    last = load_checkpoint(out / "last.pt")
    torch.manual_seed(0)  # train.py's default --seed: the weights it started from
    start = build_model("resnet18", 2, 32).state_dict()
    moved = [k for k, v in last["state_dict"].items() if v.is_floating_point() and not torch.equal(v, start[k])]
    assert "fc.weight" in moved and "conv1.weight" in moved and "bn1.running_mean" in moved


def test_logged_validation_equals_one_process_evaluation(two_process_run, odd_data):
    out, _ = two_process_run
    assert_logged_validation_is_one_process_evaluation(out, odd_data)


def test_transfer_under_torchrun(source_run, odd_data, tmp_path):
    out = tmp_path / "target"
    result = torchrun("transfer.py", "--source", source_run / "best.pt", "--data", odd_data, "--task", "target",
                      "--freeze", "1", "--epochs", "1", "--device", "cpu", "--out", out)
    assert result.returncode == 0, f"torchrun exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert result.stdout.count("DistributedDataParallel over 2 processes (gloo)") == 1, result.stdout
    assert {p.name for p in out.iterdir()} == OUTPUTS
    source, target = load_checkpoint(source_run / "best.pt"), load_checkpoint(out / "last.pt")
    assert target["lineage"]["frozen_stages"] == 1
    assert torch.equal(source["state_dict"]["conv1.weight"], target["state_dict"]["conv1.weight"])
    assert not torch.equal(source["state_dict"]["conv2.weight"], target["state_dict"]["conv2.weight"])
    assert_logged_validation_is_one_process_evaluation(out, odd_data)


def test_gather_of_a_split_smaller_than_the_world(monkeypatch):
    """3 processes, 2 validation images: the third process's share is empty (and its
    prediction has no class dimension); every process must still get all rows, in order."""
    torch.manual_seed(0)
    model, mean, std, cpu = build_model("cnn3", 2, 32), [0.5] * 3, [0.25] * 3, torch.device("cpu")
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    expected = predict_probs(model, images, mean, std, cpu)
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    shares = []
    for r in range(3):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        shares.append(predict_probs(model, distributed.shard(images), mean, std, cpu))
    assert [len(share) for share in shares] == [1, 1, 0]
    monkeypatch.setattr(distributed.dist, "all_gather_object", lambda parts, _: parts.__setitem__(slice(None), shares))
    for r in range(3):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        assert torch.equal(distributed.gather_in_order(shares[r], len(images)), expected), f"rank {r}"


DIVERGING_LAUNCHER = """
import os, sys, time
sys.path.insert(0, {repo!r})
sys.argv[0] = "train.py"
rank = int(os.environ["RANK"])
sys.stderr = open(os.path.join({logs!r}, f"rank{{rank}}.err"), "w", buffering=1)
import torch.nn.functional as F
from lib import cli
import train

real_cross_entropy, steps = F.cross_entropy, []


def cross_entropy(*args, **kwargs):
    # Process 1's second step has a NaN loss; process 0's losses stay finite.
    steps.append(1)
    loss = real_cross_entropy(*args, **kwargs)
    return loss * float("nan") if rank == 1 and len(steps) == 2 else loss


def main(args):
    try:
        train.main(args)
    finally:
        if rank == 1:
            time.sleep(5)  # process 0 must decide on its own, not be torn down by torchrun


F.cross_entropy = cross_entropy
cli.run(main, train.get_args_parser())
"""


def test_divergence_on_one_process_stops_every_process(demo_data, tmp_path):
    launcher = tmp_path / "diverge.py"
    launcher.write_text(DIVERGING_LAUNCHER.format(repo=str(REPO), logs=str(tmp_path)))
    result = torchrun(launcher, "--data", demo_data, "--task", "target", "--model", "cnn3", "--epochs", "1",
                      "--image-size", "32", "--batch-size", "16", "--amp", "off", "--device", "cpu",
                      "--out", tmp_path / "out")
    assert result.returncode != 0
    rank0 = (tmp_path / "rank0.err").read_text()
    assert "train.py: error: training diverged at epoch 1 (non-finite loss on 1 of 2 processes)" in rank0, (
        f"process 0, whose loss was finite, did not stop on its own:\n{rank0}\n{result.stderr}")
    assert "Traceback" not in rank0, rank0


def test_sync_bn_keeps_frozen_batchnorm_frozen():
    """convert_sync_batchnorm swaps in new module objects; the frozen stem's BatchNorm must be
    the new one, kept in eval mode, so its running statistics do not move. (Without a process
    group SyncBatchNorm computes like BatchNorm, so this runs on CPU.)"""
    model = build_model("resnet18", 2, 32)
    frozen = freeze_stages(model, "resnet18", 2)  # the stem (conv1, bn1) and layer1
    net, frozen = convert_sync_bn(model, frozen)
    assert isinstance(net.bn1, torch.nn.SyncBatchNorm)
    set_train_mode(net, frozen)
    for name, module in net.named_modules():
        if isinstance(module, torch.nn.SyncBatchNorm):
            assert module.training == (not name.startswith(("bn1", "layer1."))), name
    before = {name: b.clone() for name, b in net.named_buffers() if name.endswith("running_mean")}
    net(torch.randn(4, 3, 32, 32))
    after = dict(net.named_buffers())
    for name, value in before.items():
        assert torch.equal(value, after[name]) == name.startswith(("bn1.", "layer1.")), name


@pytest.fixture
def process_group_of_one(tmp_path):
    """A gloo process group of this process alone: inside a process group SyncBatchNorm refuses
    CPU tensors in training mode, as it does under torchrun."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def test_flops_of_a_sync_bn_model_are_counted_as_the_plain_model(process_group_of_one):
    """fit counts FLOPs on the model it was given, which --sync-bn converts in place under
    torchrun; the count must run (on CPU) and equal the plain model's."""
    torch.manual_seed(0)
    model = build_model("resnet18", 2, 32)
    frozen = freeze_stages(model, "resnet18", 1)
    plain = ComputeCounter(copy.deepcopy(model), 2, 32)
    counter = ComputeCounter(model, 2, 32)
    converted, _ = convert_sync_bn(model, frozen)
    assert converted is model and isinstance(model.layer1[0].bn1, torch.nn.SyncBatchNorm)
    with pytest.raises(ValueError, match="SyncBatchNorm expected input tensor to be on GPU"):
        converted.train()(torch.zeros(2, 3, 16, 16))  # what FLOP counting ran into before
    assert counter.epoch(10, 16, 5) == plain.epoch(10, 16, 5) > 0
    assert counter.epoch(10, 32, 0) == plain.epoch(10, 32, 0)


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
