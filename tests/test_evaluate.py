"""evaluate.py and lib.evaluation: metrics as scikit-learn computes them, reports, predictions, errors."""
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
from lib.evaluation import build_report, format_report, load_predictor
from lib.metrics import auroc


def test_binary_metrics_equal_scikit_learn():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 0])
    p1 = np.array([0.1, 0.4, 0.35, 0.8, 0.9, 0.65, 0.3, 0.7, 0.55, 0.2])
    probs = np.stack([1 - p1, p1], axis=1)
    report = build_report(labels, probs, ["a", "b"], n_resamples=300)
    predicted = (p1 > 0.5).astype(int)
    assert report["n_images"] == 10
    assert report["accuracy"] == pytest.approx(0.8)  # two mistakes, counted by hand
    assert report["accuracy"] == pytest.approx(skm.accuracy_score(labels, predicted))
    assert report["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, predicted))
    assert report["auroc"] == pytest.approx(skm.roc_auc_score(labels, p1))
    assert report["auroc"] == pytest.approx(0.76)  # 19 of 25 positive-negative pairs ordered
    assert report["loss"] == pytest.approx(skm.log_loss(labels, probs))
    precision, recall, f1, support = skm.precision_recall_fscore_support(labels, predicted)
    for i, name in enumerate(["a", "b"]):
        assert report["per_class"][name] == pytest.approx(
            {"precision": precision[i], "recall": recall[i], "f1": f1[i], "support": support[i]})
    assert report["confusion_matrix"] == skm.confusion_matrix(labels, predicted).tolist()
    for metric in ("accuracy", "auroc"):
        low, high = report["ci95"][metric]
        assert low <= report[metric] <= high and low < high


def test_multiclass_auroc_is_macro_one_vs_rest_and_one_vs_one():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 20)
    logits = rng.normal(size=(60, 3)) + 1.5 * np.eye(3)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    report = build_report(labels, probs, ["x", "y", "z"], n_resamples=200)
    assert report["auroc"] == pytest.approx(skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    assert report["auroc_ovo"] == pytest.approx(skm.roc_auc_score(labels, probs, multi_class="ovo", average="macro"))
    assert report["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, probs.argmax(1)))
    for metric in ("accuracy", "auroc"):
        low, high = report["ci95"][metric]
        assert low <= report[metric] <= high


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


def _softmax_of_noisy_labels(labels, classes, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(labels), classes)) + 1.5 * np.eye(classes)[labels]
    return np.exp(logits) / np.exp(logits).sum(1, keepdims=True)


def test_auroc_interval_uses_only_resamples_of_the_same_estimator():
    """Three classes, one of them a single image in 30: a resample misses it with probability
    (29/30)^30 = 0.36, and its AUROC would then average two classes instead of three, another
    estimator. Those resamples are left out of the AUROC interval and the report says how many
    were used."""
    labels = np.array([0] * 15 + [1] * 14 + [2])
    probs = _softmax_of_noisy_labels(labels, 3)
    report = build_report(labels, probs, ["x", "y", "z"], n_resamples=200, seed=0)
    assert report["auroc_estimator"] == "macro one-vs-rest over all 3 classes"
    used = report["bootstrap"]["n_resamples_auroc"]
    assert report["bootstrap"]["n_resamples"] == 200 and 100 < used < 155, used  # expected 128 (sd 7)
    # The interval is the percentiles of exactly those resamples (the same seeded draws).
    rng, kept = np.random.default_rng(0), []
    for _ in range(200):
        idx = rng.integers(0, len(labels), len(labels))
        if len(np.unique(labels[idx])) == 3:
            kept.append(skm.roc_auc_score(labels[idx], probs[idx], multi_class="ovr", average="macro"))
    assert len(kept) == used
    assert report["ci95"]["auroc"] == pytest.approx(np.percentile(kept, [2.5, 97.5]).tolist())
    assert f"{used} of 200 resamples" in format_report(report)


def test_evaluate_imports_no_torchvision_training_loop_or_matplotlib_until_it_needs_them():
    """An .onnx model needs no torchvision (whose import pulls in torch._dynamo, seconds), no
    evaluation needs the training loop, and an unlabelled split makes no plots: evaluate.py
    imports each only where it is used."""
    heavy = ("torchvision", "torch._dynamo", "lib.engine", "matplotlib")
    code = f"import sys, evaluate; print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def _per_resample_reference(labels, probs, n_resamples, seed):
    """The bootstrap as evaluate.py computed it before it was vectorised: each seeded resample
    drawn and scored by scikit-learn in turn, AUROC only on resamples holding every class."""
    rng, correct, present = np.random.default_rng(seed), probs.argmax(1) == labels, np.unique(labels)
    normalised = probs / probs.sum(1, keepdims=True)
    accuracies, aurocs = [], []
    for _ in range(n_resamples):
        idx = rng.integers(0, len(labels), len(labels))
        accuracies.append(correct[idx].mean())
        if len(np.unique(labels[idx])) < len(present):
            continue
        if probs.shape[1] == 2:
            aurocs.append(skm.roc_auc_score(labels[idx], probs[idx, 1]))
        else:
            aurocs.append(np.mean([skm.roc_auc_score(labels[idx] == c, normalised[idx, c]) for c in present]))
    return np.percentile(accuracies, [2.5, 97.5]), np.percentile(aurocs, [2.5, 97.5]), len(aurocs)


@pytest.mark.parametrize("classes", [2, 4])
def test_bootstrap_intervals_equal_scoring_each_resample_with_scikit_learn(classes, monkeypatch):
    """bootstrap_ci scores every resample at once (the Mann-Whitney statistic on image counts);
    its intervals are those of scoring the same seeded resamples one by one with scikit-learn,
    with tied scores and a rare class that some resamples miss, whatever the block size; the
    point AUROC is scikit-learn's own."""
    from lib import metrics

    labels = np.array([0] * 25 + [1] * 25 + list(range(classes)) * 3 + [classes - 1])
    probs = np.round(_softmax_of_noisy_labels(labels, classes), 1) + 0.01  # rounded: many ties
    reference_accuracy, reference_auroc, used = _per_resample_reference(labels, probs, 300, seed=3)
    intervals = metrics.bootstrap_ci(labels, probs, n_resamples=300, seed=3)
    assert intervals["accuracy"] == pytest.approx(reference_accuracy.tolist(), rel=1e-12)
    assert intervals["auroc"] == pytest.approx(reference_auroc.tolist(), rel=1e-12)
    assert intervals["n_resamples_auroc"] == used and (classes == 2 or used < 300)
    monkeypatch.setattr(metrics, "RESAMPLE_CELLS", 7 * len(labels))  # blocks of 7 resamples
    assert metrics.bootstrap_ci(labels, probs, n_resamples=300, seed=3) == intervals
    report = build_report(labels, probs, [str(c) for c in range(classes)], n_resamples=300, seed=3)
    assert report["ci95"] == {"accuracy": intervals["accuracy"], "auroc": intervals["auroc"]}
    expected = (skm.roc_auc_score(labels, probs[:, 1]) if classes == 2 else
                skm.roc_auc_score(labels, probs / probs.sum(1, keepdims=True), multi_class="ovr"))
    assert report["auroc"] == expected


def test_auroc_with_an_absent_class_names_its_estimator():
    labels = np.repeat([0, 1], 20)  # class 2 never occurs
    probs = _softmax_of_noisy_labels(labels, 3)
    report = build_report(labels, probs, ["x", "y", "z"], n_resamples=100)
    per_class = [skm.roc_auc_score(labels == c, probs[:, c]) for c in (0, 1)]
    assert report["auroc"] == pytest.approx(np.mean(per_class))
    assert report["auroc_estimator"] == "macro one-vs-rest over the 2 classes present of 3 (absent: z)"
    assert "auroc_ovo" not in report and report["bootstrap"]["n_resamples_auroc"] == 100
    assert "absent: z" in format_report(report)
    with pytest.raises(Exception, match="two classes"):
        auroc(np.zeros(5, dtype=int), probs[:5])


def test_no_auroc_interval_when_no_resample_holds_every_class():
    # Two images, one per class: a single resample holds both with probability 1/2. Find a
    # seed whose only resample does not, and see that no interval is made up.
    labels, probs = np.array([0, 1]), np.array([[0.8, 0.2], [0.3, 0.7]])
    report = next(r for r in (build_report(labels, probs, ["a", "b"], n_resamples=1, seed=seed) for seed in range(64))
                  if r["bootstrap"]["n_resamples_auroc"] == 0)
    assert report["ci95"]["auroc"] is None and report["auroc"] == 1.0
    assert "no 95% CI: none of 1 resamples held every class" in format_report(report)


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
