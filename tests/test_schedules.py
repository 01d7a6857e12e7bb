"""The schedules of lib.recipe, pure functions of (epoch, step) and the config: the learning rate
(warm-up, cosine, step, linear, onecycle; metrics.csv's lr column) and progressive resizing, alone
and through train.py."""
import csv
import math

import pytest
import torch

from conftest import run_main
from lib.augment import augment_batch
from lib.data import load_split
from lib.recipe import TrainConfig, config_lr_factor, lr_factor, train_size


def test_learning_rate_schedules_warm_up_and_decay():
    assert lr_factor(0, "cosine", 10, 3, 0.1, 0) == 1 and lr_factor(10, "cosine", 10, 3, 0.1, 0) == pytest.approx(0)
    assert lr_factor(5, "cosine", 10, 3, 0.1, 0) == pytest.approx(0.5)
    assert lr_factor(2.5, "linear", 10, 3, 0.1, 0) == pytest.approx(0.75)
    assert lr_factor(6.9, "step", 10, 3, 0.1, 0) == pytest.approx(0.01)
    assert lr_factor(0.5, "linear", 10, 3, 0.1, 1) == pytest.approx(0.5 * 0.95, rel=1e-2)
    ramp = [lr_factor(t / 4, "none", 10, 3, 0.1, 1) for t in range(8)]
    assert ramp == sorted(ramp) and ramp[0] < 0.01 and ramp[4:] == [1.0] * 4


def test_onecycle_follows_torch_one_cycle_lr():
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    steps = 200
    reference = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1.0, total_steps=steps + 1)
    # OneCycleLR ends its rise at step 0.3 * total_steps - 1; ours at 30% of a continuous run.
    peak = 0.3 * (steps + 1) - 1
    for step in range(steps + 1):
        progress = 0.3 * step / peak if step <= peak else 0.3 + 0.7 * (step - peak) / (steps - peak)
        assert lr_factor(progress * 10, "onecycle", 10, 3, 0.1, 0) == pytest.approx(
            optimizer.param_groups[0]["lr"], abs=1e-9)
        optimizer.step()
        if step < steps:
            reference.step()


def test_onecycle_gets_no_warm_up_on_top_of_its_own():
    # --scheduler onecycle with the recipe's default --warmup-epochs 1: the first epoch starts at
    # OneCycleLR's lr/25 and rises as OneCycleLR does, not from 0 (its help says so).
    config = TrainConfig(scheduler="onecycle", epochs=10)
    assert config.warmup_epochs == 1.0
    for t in (0, 0.1, 0.5, 0.99, 1, 5):
        assert config_lr_factor(t, config) == lr_factor(t, "onecycle", 10, 3, 0.1, 0)
    assert config_lr_factor(0, config) == pytest.approx(1 / 25)


def test_progressive_resizing_grows_to_full_size_and_augment_resizes():
    sizes = [train_size(epoch, 12, 32, 64) for epoch in range(1, 13)]
    assert sizes[0] == 32 and sizes[-4:] == [64] * 4 and sizes == sorted(sizes)
    assert all(s % 8 == 0 for s in sizes)
    # The recipe's 20 epochs, as before the fix for other sizes: 64 px from epoch 14 on.
    assert [train_size(e, 20, 32, 64) for e in range(1, 21)] == [32, 32, 40, 40, 40, 40, 48, 48, 48, 56,
                                                                56, 56, 56] + [64] * 7
    assert [train_size(e, 5, None, 64) for e in range(1, 6)] == [64] * 5
    for epochs in range(1, 41):
        for image_size, min_size in ((64, 32), (68, 32), (100, 32), (227, 16), (64, 20), (64, 60)):
            sizes = [train_size(e, epochs, min_size, image_size) for e in range(1, epochs + 1)]
            full = sum(size == image_size for size in sizes)
            assert sizes[-1] == image_size and full >= epochs / 4, (epochs, image_size, min_size, sizes)
            assert min(sizes) >= min_size and max(sizes) == image_size and sizes == sorted(sizes)
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    for preset in ("none", "standard"):
        out = augment_batch(images, preset, torch.Generator().manual_seed(0), size=40)
        assert out.shape == (4, 3, 40, 40) and 0 <= out.min() and out.max() <= 1


@pytest.mark.parametrize("image_size, min_size, epochs, expected", [
    (68, 32, 4, [32, 48, 68, 68]),
    (100, 32, 4, [32, 64, 100, 100]),
    (227, 216, 2, [216, 227]),
    (64, 32, 1, [64]),
    (64, 20, 4, [20, 40, 64, 64]),
])
def test_progressive_resizing_ends_at_full_size_through_the_script(tiny_imagefolder, tmp_path, image_size, min_size,
                                                                    epochs, expected):
    result = run_main("train.py", "--data", tiny_imagefolder, "--image-size", image_size, "--min-size", min_size,
                      "--epochs", epochs, "--batch-size", 4, "--eval-every", 99, "--out", tmp_path / "run")
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [int(r["size"]) for r in rows] == expected
    logged = [int(line.split("px")[0].split()[-1]) for line in result.stdout.splitlines() if line.startswith("epoch")]
    assert logged == expected


def test_lr_column_is_the_rate_each_epoch_trained_with(source_run, demo_data):
    # source_run: 3 epochs of the recipe's schedule from lr 2e-3 (a warm-up epoch, then cosine),
    # stepped every batch: the column is the mean rate of the epoch's steps, read before each
    # step, so the last epoch still trains (not 0).
    rows = list(csv.DictReader(open(source_run / "metrics.csv")))
    steps = math.ceil(len(load_split(demo_data, "train", "source")) / 64)
    expected = [2e-3 * sum(lr_factor(step / steps, "cosine", 3, 10, 0.1, 1.0)
                           for step in range((epoch - 1) * steps, epoch * steps)) / steps for epoch in (1, 2, 3)]
    assert [float(r["lr"]) for r in rows] == pytest.approx(expected, rel=1e-9)
    assert expected[0] < expected[1] and expected[2] > 0
