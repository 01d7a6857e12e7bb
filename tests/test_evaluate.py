"""evaluate.py and lib.evaluation: reports, predictions, TTA, errors (the metrics themselves: test_metrics.py)."""
import csv
import json
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from conftest import REPO, run_main, run_script
from lib.data import load_split
from lib.demo import TARGET_CLASSES
from lib.evaluation import load_predictor


def test_evaluate_writes_report_plots_and_predictions(demo_data, target_run, tmp_path):
    out, extra = tmp_path / "eval", tmp_path / "extra.json"
    result = run_script("evaluate.py", "--checkpoint", target_run / "best.pt", "--data", demo_data,
                        "--split", "val", "--out", out, "--json", extra)
    assert "AUROC" in result.stdout and "95% CI" in result.stdout
    assert "1000 of 1000 resamples" in result.stdout and "binary: palace (class 1)" in result.stdout
    for name in ("metrics.json", "roc.png", "confusion.png", "predictions.csv", "mistakes.png"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "metrics.json").read_text())
    assert json.loads(extra.read_text()) == report
    for key in ("n_images", "accuracy", "balanced_accuracy", "auroc", "loss", "per_class", "confusion_matrix"):
        assert key in report, key
    assert report["auroc_estimator"] == "binary: palace (class 1) against portico_rotunda"
    assert report["bootstrap"] == {"n_resamples": 1000, "n_resamples_auroc": 1000, "seed": 0}
    assert report["n_images"] == 60 and sum(map(sum, report["confusion_matrix"])) == 60
    for metric in ("accuracy", "auroc"):
        low, high = report["ci95"][metric]
        assert low <= report[metric] <= high
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert list(rows[0]) == ["filename", "true_label", "predicted_label"] + [f"prob_{c}" for c in TARGET_CLASSES]
    assert len(rows) == 60
    assert np.mean([r["true_label"] == r["predicted_label"] for r in rows]) == pytest.approx(report["accuracy"])
    probs = np.array([[float(r[f"prob_{c}"]) for c in TARGET_CLASSES] for r in rows])
    labels = np.array([TARGET_CLASSES.index(r["true_label"]) for r in rows])
    assert skm.roc_auc_score(labels, probs[:, 1]) == pytest.approx(report["auroc"], abs=1e-4)


def test_challenge_split_gets_predictions_only(demo_data, target_run, tmp_path):
    out = tmp_path / "challenge"
    run_main("evaluate.py", "--checkpoint", target_run / "best.pt", "--data", demo_data, "--task", "target",
             "--split", "challenge", "--out", out)
    assert sorted(p.name for p in out.iterdir()) == ["predictions.csv"]
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 20 and all(r["true_label"] == "" for r in rows)
    assert all(r["predicted_label"] in TARGET_CLASSES for r in rows)


def test_class_mismatch_is_a_one_line_error(demo_data, source_run, tmp_path):
    result = run_main("evaluate.py", "--checkpoint", source_run / "best.pt", "--data", demo_data,
                      "--task", "target", "--split", "val", "--out", tmp_path / "eval", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "differ" in result.stderr
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_tta_averages_the_image_and_its_mirror(demo_data, target_run):
    predictor = load_predictor(target_run / "best.pt", torch.device("cpu"))
    assert list(predictor.preprocessing.classes) == TARGET_CLASSES and predictor.preprocessing.image_size == 64
    images = load_split(demo_data, "val", "target").images[:8]
    plain, mirrored = predictor.predict(images), predictor.predict(images.flip(3))
    assert isinstance(plain, np.ndarray) and plain.shape == (8, 2)
    np.testing.assert_allclose(predictor.predict(images, tta=True), (plain + mirrored) / 2, atol=1e-6)
    assert not np.allclose(plain, mirrored)


def test_onnx_branch_feeds_channels_last_pixels_and_mirrors_them(demo_data, target_run, monkeypatch, tmp_path):
    """Against a stand-in for lib.edge.OnnxClassifier that runs the PyTorch model on NHWC uint8."""
    torch_predictor = load_predictor(target_run / "best.pt", torch.device("cpu"))

    class FakeOnnxClassifier:
        def __init__(self, path):
            self.preprocessing = torch_predictor.preprocessing

        def predict_proba(self, pixels):
            assert pixels.dtype == np.uint8 and pixels.shape[-1] == 3
            return torch_predictor.predict(torch.from_numpy(pixels.copy()).permute(0, 3, 1, 2))

    monkeypatch.setitem(sys.modules, "lib.edge", types.SimpleNamespace(OnnxClassifier=FakeOnnxClassifier))
    onnx_file = tmp_path / "stand-in.onnx"
    onnx_file.touch()
    predictor = load_predictor(onnx_file, torch.device("cpu"))
    images = load_split(demo_data, "val", "target").images[:8]
    assert predictor.preprocessing == torch_predictor.preprocessing
    for tta in (False, True):
        np.testing.assert_allclose(predictor.predict(images, tta=tta), torch_predictor.predict(images, tta=tta),
                                   atol=1e-6)


def test_evaluate_imports_no_torchvision_training_loop_or_matplotlib_until_it_needs_them():
    """An .onnx model needs no torchvision (whose import pulls in torch._dynamo, seconds), no
    evaluation needs the training loop, and an unlabelled split makes no plots: evaluate.py
    imports each only where it is used."""
    heavy = ("torchvision", "torch._dynamo", "lib.engine", "matplotlib")
    code = f"import sys, evaluate; print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_evaluate_tta_from_the_command_line(demo_data, target_run, tmp_path):
    out = tmp_path / "tta"
    run_main("evaluate.py", "--checkpoint", target_run / "best.pt", "--data", demo_data, "--split", "val",
             "--tta", "--out", out)
    report = json.loads((out / "metrics.json").read_text())
    assert report["tta"] is True
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    written = np.array([[float(r[f"prob_{c}"]) for c in TARGET_CLASSES] for r in rows])
    images = load_split(demo_data, "val", "target").images
    predictor = load_predictor(target_run / "best.pt", torch.device("cpu"))
    np.testing.assert_allclose(written, predictor.predict(images, tta=True), atol=1e-6)
    assert not np.allclose(written, predictor.predict(images), atol=1e-4), "TTA changed nothing"


def test_a_split_of_one_class_is_evaluated_without_auroc(demo_data, target_run, tmp_path):
    """Photos of one landmark: accuracy (its recall) and loss are what they say; AUROC does not
    exist, and the report says why instead of refusing the split."""
    from test_reliability import copy_dataset
    data = copy_dataset(demo_data, tmp_path / "d", rows=lambda rows: [
        r for r in rows if r["partition"] == "train" or r["semantic_label"] == TARGET_CLASSES[1]])
    out = tmp_path / "eval"
    result = run_main("evaluate.py", "--checkpoint", target_run / "best.pt", "--data", data, "--split", "val",
                      "--out", out)
    report = json.loads((out / "metrics.json").read_text())
    assert report["auroc"] is None and report["ci95"]["auroc"] is None
    assert report["auroc_estimator"] == f"none: AUROC needs images of two classes, this split holds " \
                                        f"{TARGET_CLASSES[1]} only"
    assert report["accuracy"] == report["per_class"][TARGET_CLASSES[1]]["recall"]
    assert "AUROC             -" in result.stdout and (out / "roc.png").stat().st_size > 0
