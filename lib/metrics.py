"""Classification metrics from probabilities, whatever produced them (PyTorch or ONNX).

Binary tasks report the AUROC of class 1; multi-class tasks the macro one-vs-rest AUROC over the
classes present (and one-vs-one in the full report when every class is). scikit-learn does the
arithmetic; the report names the estimator it used.
"""
import warnings

import numpy as np
from sklearn import metrics as skm

from lib.errors import UserError


def _as_numpy(labels, probs):
    return np.asarray(labels, dtype=np.int64), np.asarray(probs, dtype=np.float64)


def log_loss(labels, probs):
    labels, probs = _as_numpy(labels, probs)
    picked = probs[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(picked, 1e-12, None)).mean())


def auroc(labels, probs, multi_class="ovr"):
    """Binary: AUROC of class 1. Multi-class: the mean of each class's one-vs-rest AUROC over
    the classes present (scikit-learn's macro one-vs-rest when all are), or with
    multi_class="ovo" scikit-learn's macro one-vs-one, which needs every class."""
    labels, probs = _as_numpy(labels, probs)
    present = np.unique(labels)
    if len(present) < 2:
        raise UserError("AUROC needs at least two classes in the split; this one has only one")
    if probs.shape[1] == 2:
        return float(skm.roc_auc_score(labels, probs[:, 1]))
    probs = probs / probs.sum(axis=1, keepdims=True)
    if multi_class == "ovo":
        return float(skm.roc_auc_score(labels, probs, multi_class="ovo", average="macro"))
    return float(np.mean([skm.roc_auc_score(labels == c, probs[:, c]) for c in present]))


def auroc_estimator(labels, classes):
    """In words, what auroc() computes for these labels (the report says which one it gave)."""
    if len(classes) == 2:
        return f"binary: {classes[1]} (class 1) against {classes[0]}"
    present = set(np.unique(np.asarray(labels)).tolist())
    if len(present) == len(classes):
        return f"macro one-vs-rest over all {len(classes)} classes"
    absent = [name for i, name in enumerate(classes) if i not in present]
    return (f"macro one-vs-rest over the {len(present)} classes present of {len(classes)} "
            f"(absent: {', '.join(absent)})")


def balanced_accuracy(labels, predicted):
    """Mean recall over the classes that have images (scikit-learn's balanced accuracy, without
    its warning when a prediction names a class the split lacks)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(skm.balanced_accuracy_score(labels, predicted))


def per_class_recall(labels, probs, classes):
    """{class name: recall} of labels (N,) and probabilities (N, C): the share of each class's images
    predicted as that class; None for a class without images."""
    labels, probs = _as_numpy(labels, probs)
    recall = skm.recall_score(labels, probs.argmax(1), labels=range(len(classes)), average=None, zero_division=0)
    counts = np.bincount(labels, minlength=len(classes))
    return {name: float(recall[i]) if counts[i] else None for i, name in enumerate(classes)}


def epoch_metrics(labels, probs):
    """The few numbers logged every epoch."""
    labels, probs = _as_numpy(labels, probs)
    return {"loss": log_loss(labels, probs),
            "accuracy": float((probs.argmax(1) == labels).mean()),
            "auroc": auroc(labels, probs),
            "balanced_accuracy": balanced_accuracy(labels, probs.argmax(1))}


def full_report(labels, probs, classes):
    """Everything evaluate.py reports for a labelled split."""
    labels, probs = _as_numpy(labels, probs)
    predicted = probs.argmax(1)
    everything = list(range(len(classes)))
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        labels, predicted, labels=everything, zero_division=0)
    report = {
        "n_images": int(len(labels)),
        "accuracy": float(skm.accuracy_score(labels, predicted)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(labels, predicted)),
        "auroc": auroc(labels, probs),
        "auroc_estimator": auroc_estimator(labels, classes),
        "loss": log_loss(labels, probs),
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]),
                             "f1": float(f1[i]), "support": int(support[i])}
                      for i, name in enumerate(classes)},
        "confusion_matrix": skm.confusion_matrix(labels, predicted, labels=everything).tolist(),
    }
    if len(classes) > 2 and len(np.unique(labels)) == len(classes):
        report["auroc_ovo"] = auroc(labels, probs, multi_class="ovo")
    return report


def bootstrap_ci(labels, probs, n_resamples=1000, seed=0, level=0.95):
    """Percentile bootstrap intervals for accuracy and AUROC over resampled images.

    AUROC is computed only on resamples that hold every class of the full split, so each one
    is the same estimator as the point estimate (an average over the same classes); the
    others are left out and counted: n_resamples_auroc says how many were used. None when
    no resample qualifies.
    """
    labels, probs = _as_numpy(labels, probs)
    rng = np.random.default_rng(seed)
    correct = probs.argmax(1) == labels
    present = len(np.unique(labels))
    accuracies, aurocs = [], []
    for _ in range(n_resamples):
        idx = rng.integers(0, len(labels), len(labels))
        accuracies.append(correct[idx].mean())
        if present > 1 and len(np.unique(labels[idx])) == present:
            aurocs.append(auroc(labels[idx], probs[idx]))
    tail = (1 - level) / 2 * 100
    return {"accuracy": [float(v) for v in np.percentile(accuracies, [tail, 100 - tail])],
            "auroc": [float(v) for v in np.percentile(aurocs, [tail, 100 - tail])] if aurocs else None,
            "level": level, "n_resamples": n_resamples, "n_resamples_auroc": len(aurocs)}
