"""Classification metrics from probabilities, whatever produced them (PyTorch or ONNX).

Binary tasks report the AUROC of class 1; multi-class tasks the macro one-vs-rest AUROC
(and one-vs-one in the full report). scikit-learn does the arithmetic.
"""
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
    labels, probs = _as_numpy(labels, probs)
    if len(np.unique(labels)) < 2:
        raise UserError("AUROC needs at least two classes in the split; this one has only one")
    if probs.shape[1] == 2:
        return float(skm.roc_auc_score(labels, probs[:, 1]))
    present = np.unique(labels)
    if len(present) < probs.shape[1]:
        # Some classes absent: average one-vs-rest over those present.
        return float(np.mean([skm.roc_auc_score(labels == c, probs[:, c]) for c in present]))
    probs = probs / probs.sum(axis=1, keepdims=True)
    return float(skm.roc_auc_score(labels, probs, multi_class=multi_class, average="macro"))


def epoch_metrics(labels, probs):
    """The few numbers logged every epoch."""
    labels, probs = _as_numpy(labels, probs)
    return {"loss": log_loss(labels, probs),
            "accuracy": float((probs.argmax(1) == labels).mean()),
            "auroc": auroc(labels, probs)}


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
    """Percentile bootstrap intervals for accuracy and AUROC over resampled images."""
    labels, probs = _as_numpy(labels, probs)
    rng = np.random.default_rng(seed)
    correct = probs.argmax(1) == labels
    accuracies, aurocs = [], []
    for _ in range(n_resamples):
        idx = rng.integers(0, len(labels), len(labels))
        accuracies.append(correct[idx].mean())
        if len(np.unique(labels[idx])) > 1:
            aurocs.append(auroc(labels[idx], probs[idx]))
    tail = (1 - level) / 2 * 100
    return {"accuracy": [float(v) for v in np.percentile(accuracies, [tail, 100 - tail])],
            "auroc": [float(v) for v in np.percentile(aurocs, [tail, 100 - tail])],
            "level": level, "n_resamples": n_resamples}
