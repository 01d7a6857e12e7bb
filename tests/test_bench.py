"""The benchmarks in bench/: bench_train.py's GFLOP/s per precision (on CSV and ImageFolder data) and
plot_recipes.py's figure."""
import json

import pytest

from conftest import run_script
from lib import flops
from lib.models import build_model


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


def test_benchmark_runs_on_an_imagefolder_sorted_by_class(tiny_imagefolder):
    """The timed rows are spread over the split: the first rows of an ImageFolder hold one class."""
    result = run_script("bench/bench_train.py", "--data", tiny_imagefolder, "--models", "cnn3", "--amp", "off",
                        "--batch-size", "4", "--steps", "1", "--repeats", "1", "--warmup", "1")
    assert "cnn3 float32" in result.stdout


def test_recipe_plot_marks_both_defaults(tmp_path):
    table = tmp_path / "recipes.csv"
    table.write_text("setting,seed,val_accuracy,val_auroc,tflop,seconds,role\n"
                     "old,0,0.86,0.98,240,1300,old default\nnew,0,0.90,0.99,16,106,new default\n"
                     "new,1,0.89,0.99,16,106,new default\nother,0,0.88,0.987,24,160,\n")
    result = run_script("bench/plot_recipes.py", table, tmp_path / "recipes.png")
    assert "3 settings" in result.stdout and (tmp_path / "recipes.png").stat().st_size > 10_000
