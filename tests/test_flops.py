"""FLOPs (lib.flops): convolutions counted as torch.utils.flop_counter counts them, frozen stages'
backward skipped, grouped convolutions per group, and the compute train.py's metrics.csv reports."""
import csv

import pytest
import torch

from conftest import run_main
from lib import flops
from lib.checkpoint import load_checkpoint
from lib.data import load_split
from lib.models import build_model


def test_flops_count_the_convolutions_and_skip_frozen_backward():
    model = build_model("cnn3", 2, 64)
    # 2 FLOPs per multiply-add. conv1: 16 channels at 32x32 from 5x5x3 weights; conv2: 64
    # channels at 8x8 from 5x5x16.
    conv1, conv2 = 2 * 16 * 32 * 32 * 5 * 5 * 3, 2 * 64 * 8 * 8 * 5 * 5 * 16
    assert flops.inference_flops(model, 64) > conv1
    trained = flops.training_flops(model, 64, 2)
    assert 2.5 < trained / flops.inference_flops(model, 64) < 3.5
    for parameter in model.conv1.parameters():
        parameter.requires_grad_(False)
    # Frozen, conv1 needs no weight gradient and conv2 no input gradient (nothing before it learns).
    assert flops.training_flops(model, 64, 2) == pytest.approx(trained - conv1 - conv2, rel=1e-6)


def test_grouped_convolutions_backward_is_counted_per_group():
    """A depthwise 3x3 convolution after a dense one: its backward is two convolutions of its
    own size (input and weight gradients), not dense ones (torch 2.14's flop counter ignores
    groups in the weight gradient; lib.flops corrects it)."""
    dense, depthwise = torch.nn.Conv2d(3, 32, 1, bias=False), torch.nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
    model = torch.nn.Sequential(dense, depthwise, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(32, 2, bias=False))
    dense_flops, depthwise_flops, head = 2 * 32 * 3 * 8 * 8, 2 * 32 * 9 * 8 * 8, 2 * 32 * 2
    assert flops.inference_flops(model, 8) == dense_flops + depthwise_flops + head
    # dense: forward and weight gradient (its input needs none); depthwise and head: all three.
    assert flops.training_flops(model, 8, 2) == 2 * dense_flops + 3 * depthwise_flops + 3 * head
    mobilenet = build_model("mobilenet_v3_small", 8, 128)
    assert 2.5 < flops.training_flops(mobilenet, 128, 8) / flops.inference_flops(mobilenet, 128) < 3.5


def test_metrics_report_compute_and_validation_every_few_epochs(demo_data, tmp_path):
    out = tmp_path / "run"
    result = run_main("train.py", "--data", demo_data, "--task", "target", "--model", "fastnet", "--epochs", "4",
                      "--min-size", "32", "--eval-every", "2", "--ema", "0.9", "--warmup-epochs", "1",
                      "--out", out)
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["size"]) for r in rows] == [32, 48, 64, 64]
    assert [r["val_loss"] != "" for r in rows] == [False, True, False, True], "odd epochs are not validated"
    model = build_model("fastnet", 2, 64)
    train, val = load_split(demo_data, "train", "target"), load_split(demo_data, "val", "target")
    # A validation also forwards the 64 training images (--ema-bn-images) that re-estimate the
    # average's BatchNorm statistics.
    expected = [len(train) * flops.training_flops(model, size, 2) +
                ((len(val) + 64) * flops.inference_flops(model, 64) if validated else 0)
                for size, validated in ((32, False), (48, True), (64, False), (64, True))]
    assert [float(r["tflop"]) * 1e12 for r in rows] == pytest.approx(expected, rel=1e-9)
    assert float(rows[-1]["total_tflop"]) * 1e12 == pytest.approx(sum(expected), rel=1e-9)
    [closing] = [line for line in result.stdout.splitlines() if "model.pt: epoch" in line]
    assert f"{sum(expected) / 1e12:.2f} TFLOP" in closing
    # With --ema the average is what is validated and saved as state_dict; last.pt keeps the
    # weights being trained beside it for --resume.
    training = load_checkpoint(out / "last.pt")["training"]
    last = load_checkpoint(out / "last.pt")
    averaged = {k.removeprefix("module."): v for k, v in training["ema"].items() if k.startswith("module.")}
    assert all(torch.equal(last["state_dict"][k], averaged[k]) for k in last["state_dict"])
    assert any(not torch.equal(training["raw_state_dict"][k], averaged[k]) for k in averaged)
    assert flops.inference_flops(model, 64) / 1e9 < 0.35
