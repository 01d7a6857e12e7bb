"""The fast recipe's parts: FLOP accounting, progressive resizing, the learning-rate schedule,
weight averaging, validation every few epochs, stem variants, and cross-validation."""
import csv
import json
import math

import pytest
import torch

from conftest import run_script
from lib import crossval, flops
from lib.augment import augment_batch
from lib.checkpoint import FORMAT, build_from_checkpoint, load_checkpoint
from lib.data import load_split
from lib.edge import OnnxClassifier
from lib.engine import lr_factor, train_size
from lib.models import build_model, resolve_stem


def test_learning_rate_schedules_warm_up_and_decay():
    assert lr_factor(0, "cosine", 10, 3, 0.1, 0) == 1 and lr_factor(10, "cosine", 10, 3, 0.1, 0) == pytest.approx(0)
    assert lr_factor(5, "cosine", 10, 3, 0.1, 0) == pytest.approx(0.5)
    assert lr_factor(2.5, "linear", 10, 3, 0.1, 0) == pytest.approx(0.75)
    assert lr_factor(6.9, "step", 10, 3, 0.1, 0) == pytest.approx(0.01)
    assert lr_factor(0.5, "linear", 10, 3, 0.1, 1) == pytest.approx(0.5 * 0.95, rel=1e-2)
    ramp = [lr_factor(t / 4, "none", 10, 3, 0.1, 1) for t in range(8)]
    assert ramp == sorted(ramp) and ramp[0] < 0.01 and ramp[4:] == [1.0] * 4


def test_progressive_resizing_grows_to_full_size_and_augment_resizes():
    sizes = [train_size(epoch, 12, 32, 64) for epoch in range(1, 13)]
    assert sizes[0] == 32 and sizes[-4:] == [64] * 4 and sizes == sorted(sizes)
    assert all(s % 8 == 0 for s in sizes)
    assert [train_size(e, 5, None, 64) for e in range(1, 6)] == [64] * 5
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    for preset in ("none", "standard"):
        out = augment_batch(images, preset, torch.Generator().manual_seed(0), size=40)
        assert out.shape == (4, 3, 40, 40) and 0 <= out.min() and out.max() <= 1


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


def test_metrics_report_compute_and_validation_every_few_epochs(demo_data, tmp_path):
    out = tmp_path / "run"
    result = run_script("train.py", "--data", demo_data, "--task", "target", "--model", "fastnet", "--epochs", "4",
                        "--min-size", "32", "--eval-every", "2", "--ema", "0.9", "--warmup-epochs", "1",
                        "--out", out)
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["size"]) for r in rows] == [32, 48, 64, 64]
    assert [r["val_loss"] != "" for r in rows] == [False, True, False, True], "odd epochs are not validated"
    model = build_model("fastnet", 2, 64)
    train, val = load_split(demo_data, "train", "target"), load_split(demo_data, "val", "target")
    expected = [len(train) * flops.training_flops(model, size, 2) +
                (len(val) * flops.inference_flops(model, 64) if validated else 0)
                for size, validated in ((32, False), (48, True), (64, False), (64, True))]
    assert [float(r["tflop"]) * 1e12 for r in rows] == pytest.approx(expected, rel=1e-9)
    assert float(rows[-1]["total_tflop"]) * 1e12 == pytest.approx(sum(expected), rel=1e-9)
    assert f"{sum(expected) / 1e12:.2f} TFLOP" in result.stdout.splitlines()[-1]
    # With --ema the average is what is validated and saved as state_dict; last.pt keeps the
    # weights being trained beside it for --resume.
    last = load_checkpoint(out / "last.pt")
    averaged = {k.removeprefix("module."): v for k, v in last["ema"].items() if k.startswith("module.")}
    assert all(torch.equal(last["state_dict"][k], averaged[k]) for k in last["state_dict"])
    assert any(not torch.equal(last["raw_state_dict"][k], averaged[k]) for k in averaged)
    best = load_checkpoint(out / "best.pt")
    if best["epoch"] == 4:
        assert all(torch.equal(best["state_dict"][k], averaged[k]) for k in best["state_dict"])
    exported = run_script("export.py", "--checkpoint", out / "best.pt", "--out", out / "model.onnx").stdout
    metadata = OnnxClassifier(out / "model.onnx").metadata
    assert (metadata["architecture"], metadata["stem"]) == ("fastnet", "standard")
    gflop = flops.inference_flops(model, 64) / 1e9
    assert float(metadata["gflop_per_image"]) == pytest.approx(gflop, abs=1e-4) and gflop < 0.35
    assert f"{gflop:.3f} GFLOP per image" in exported


def test_stem_is_recorded_and_old_checkpoints_rebuild_as_they_were():
    assert resolve_stem("resnet18", 64) == "no-maxpool" and resolve_stem("resnet18", 224) == "stock"
    assert resolve_stem("fastnet", 64) == "standard"
    torch.manual_seed(0)
    stock = build_model("resnet18", 2, 64, "stock")
    base = {"format": FORMAT, "model": "resnet18", "classes": ["a", "b"], "image_size": 64, "mean": [0.5] * 3,
            "std": [0.25] * 3, "state_dict": stock.state_dict()}
    legacy = build_from_checkpoint(base)  # written before checkpoints named their stem
    assert isinstance(legacy.maxpool, torch.nn.Identity)
    rebuilt = build_from_checkpoint({**base, "stem": "stock"})
    assert isinstance(rebuilt.maxpool, torch.nn.MaxPool2d)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), stock.eval()(x))
        assert not torch.allclose(legacy(x), rebuilt(x)), "same weights, other stem: another network"


def test_folds_are_stratified_disjoint_and_repeatable(demo_data):
    labelled = crossval.pool(load_split(demo_data, "train", "target"), load_split(demo_data, "val", "target"))
    first = [sorted(heldout.filenames) for _, heldout in crossval.folds(labelled, 4, seed=1)]
    again = [sorted(heldout.filenames) for _, heldout in crossval.folds(labelled, 4, seed=1)]
    assert first == again and sorted(sum(first, [])) == sorted(labelled.filenames)
    for train, heldout in crossval.folds(labelled, 4, seed=1):
        assert not set(train.filenames) & set(heldout.filenames)
        share = heldout.labels.float().mean().item()
        assert abs(share - labelled.labels.float().mean().item()) < 0.05


def test_crossval_script_reports_every_fold(source_run, demo_data, tmp_path):
    out = tmp_path / "cv"
    result = run_script("crossval.py", "--source", source_run / "best.pt", "--data", demo_data, "--task", "target",
                        "--folds", "2", "--epochs", "1", "--out", out)
    rows = list(csv.DictReader(open(out / "crossval.csv")))
    assert [int(r["fold"]) for r in rows] == [1, 2]
    assert sum(int(r["heldout_images"]) for r in rows) == 140
    assert all(int(r["train_images"]) + int(r["heldout_images"]) == 140 for r in rows)
    summary = json.loads((out / "crossval.json").read_text())
    assert summary["auroc"]["mean"] == pytest.approx(sum(float(r["auroc"]) for r in rows) / 2)
    for r in rows:
        fold = load_checkpoint(out / f"fold-{r['fold']}" / "last.pt")
        assert fold["metrics"]["val_loss"] == pytest.approx(float(r["loss"]))
    assert "mean" in result.stdout and math.isfinite(summary["loss"]["mean"])


def test_benchmark_reports_gflops_per_precision(demo_data, tmp_path):
    out = tmp_path / "bench.json"
    result = run_script("bench/bench_train.py", "--data", demo_data, "--task", "target", "--models", "cnn3",
                        "--amp", "off", "--steps", "1", "--repeats", "1", "--warmup", "0", "--json", out)
    report = json.loads(out.read_text())
    assert list(report["models"]) == ["cnn3 float32"] and report["conditions"]["precisions"] == ["float32"]
    row = report["models"]["cnn3 float32"]
    model = build_model("cnn3", 2, 64)
    assert row["train_gflop_per_image"] == pytest.approx(flops.training_flops(model, 64, 2) / 1e9)
    assert row["bare_gflops_wall"] == pytest.approx(row["bare_wall"] * row["train_gflop_per_image"])
    assert "bare GFLOP/s" in result.stdout and "cnn3 float32" in result.stdout


def test_recipe_plot_marks_both_defaults(tmp_path):
    table = tmp_path / "recipes.csv"
    table.write_text("setting,seed,val_accuracy,val_auroc,tflop,seconds,role\n"
                     "old,0,0.86,0.98,240,1300,old default\nnew,0,0.90,0.99,16,106,new default\n"
                     "new,1,0.89,0.99,16,106,new default\nother,0,0.88,0.987,24,160,\n")
    result = run_script("bench/plot_recipes.py", table, tmp_path / "recipes.png")
    assert "3 settings" in result.stdout and (tmp_path / "recipes.png").stat().st_size > 10_000
