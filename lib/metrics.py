"""Classification metrics from probabilities, whatever produced them (PyTorch or ONNX).

Binary tasks report the AUROC of class 1; multi-class tasks the macro one-vs-rest AUROC over the
classes present (and one-vs-one in the full report when every class is). scikit-learn does the
arithmetic; the report names the estimator it used.
"""
import warnings

import numpy as np
from scipy import stats
from sklearn import metrics as skm

from lib.errors import UserError

RESAMPLE_CELLS = 2 ** 21  # resamples x images scored at once: a few (R, N) float64 arrays of 16 MiB


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
    present = set(np.unique(np.asarray(labels)).tolist())
    if len(present) < 2:
        only = ", ".join(classes[i] for i in sorted(present)) or "no images"
        return f"none: AUROC needs images of two classes, this split holds {only} only"
    if len(classes) == 2:
        return f"binary: {classes[1]} (class 1) against {classes[0]}"
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
    """The few numbers logged every epoch. AUROC is nan where the images hold one class only: an
    epoch's training batches can, when the shuffle leaves a class's only image in the last batch
    that is dropped (lib.engine), and that must not end the run (validation needs two classes:
    lib.engine.check_splits)."""
    labels, probs = _as_numpy(labels, probs)
    return {"loss": log_loss(labels, probs),
            "accuracy": float((probs.argmax(1) == labels).mean()),
            "auroc": auroc(labels, probs) if len(np.unique(labels)) > 1 else float("nan"),
            "balanced_accuracy": balanced_accuracy(labels, probs.argmax(1))}


def full_report(labels, probs, classes):
    """Everything evaluate.py reports for a labelled split; auroc None for a split of one class
    (e.g. photos of one landmark), whose accuracy, recall and loss still mean what they say."""
    labels, probs = _as_numpy(labels, probs)
    predicted = probs.argmax(1)
    everything = list(range(len(classes)))
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        labels, predicted, labels=everything, zero_division=0)
    report = {
        "n_images": int(len(labels)),
        "accuracy": float(skm.accuracy_score(labels, predicted)),
        "balanced_accuracy": balanced_accuracy(labels, predicted),
        "auroc": auroc(labels, probs) if len(np.unique(labels)) > 1 else None,  # one class: accuracy is recall
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
    no resample qualifies. The resamples are default_rng(seed).integers(0, N, N), drawn
    n_resamples times; all are scored at once (resampled_auroc), in blocks of at most
    RESAMPLE_CELLS counts to bound memory on large splits.
    """
    labels, probs = _as_numpy(labels, probs)
    rng = np.random.default_rng(seed)
    correct = probs.argmax(1) == labels
    present = np.unique(labels)
    accuracies, aurocs = [], []
    block = max(1, RESAMPLE_CELLS // len(labels))
    for start in range(0, n_resamples, block):
        counts = resample_counts(rng, len(labels), min(block, n_resamples - start))
        accuracies.append(counts @ correct / len(labels))
        if len(present) > 1:
            every_class = np.all([counts[:, labels == c].sum(1) > 0 for c in present], axis=0)
            aurocs.append(resampled_auroc(labels, probs, counts[every_class]))
    aurocs = np.concatenate(aurocs) if aurocs else np.empty(0)
    tail = (1 - level) / 2 * 100
    return {"accuracy": [float(v) for v in np.percentile(np.concatenate(accuracies), [tail, 100 - tail])],
            "auroc": [float(v) for v in np.percentile(aurocs, [tail, 100 - tail])] if len(aurocs) else None,
            "level": level, "n_resamples": n_resamples, "n_resamples_auroc": len(aurocs)}


def resample_counts(rng, n, n_resamples):
    """(n_resamples, n) int64: how often each of n images is drawn in each bootstrap resample, the
    resamples being rng.integers(0, n, n) drawn n_resamples times (one call draws the same stream)."""
    drawn = rng.integers(0, n, (n_resamples, n)) + n * np.arange(n_resamples)[:, None]
    return np.bincount(drawn.ravel(), minlength=n_resamples * n).reshape(n_resamples, n)


def resampled_auroc(labels, probs, counts):
    """auroc()'s estimator on every resample at once: labels (N,), probabilities (N, C), image
    counts or weights (R, N) -> (R,). Binary: the AUROC of class 1; multi-class: the mean
    one-vs-rest AUROC over the classes present in `labels`. nan for a resample that lacks one of
    them. Equal to auroc(labels[idx], probs[idx]) for the resample idx (tested)."""
    labels, probs = _as_numpy(labels, probs)
    if probs.shape[1] == 2:
        return weighted_auroc(labels == 1, probs[:, 1], counts)
    probs = probs / probs.sum(axis=1, keepdims=True)  # auroc()'s normalisation
    return np.mean([weighted_auroc(labels == c, probs[:, c], counts) for c in np.unique(labels)], axis=0)


def weighted_auroc(positive, scores, weights):
    """Binary AUROC of `scores` (N,) for the boolean labels `positive` (N,) under each row of
    image weights (R, N), e.g. bootstrap counts: all R at once, where scikit-learn takes a call
    (about a millisecond) per row. The Mann-Whitney form: the weighted share of (positive,
    negative) pairs that the scores order correctly, ties counting half; equal to
    sklearn.metrics.roc_auc_score(positive, scores, sample_weight=row) (tested). Returns (R,);
    nan for a row that gives no weight to one of the two classes.
    """
    order = np.argsort(scores, kind="stable")
    ordered, positive, weights = scores[order], positive[order], weights[:, order]
    negative_weight = weights * ~positive
    # Weight of the negatives sorted below position k, for k = 0..N; an image's tie group spans
    # the positions [first, last) that hold its score.
    below = np.concatenate([np.zeros((len(weights), 1)), np.cumsum(negative_weight, axis=1)], axis=1)
    first, last = np.searchsorted(ordered, ordered, side="left"), np.searchsorted(ordered, ordered, side="right")
    beaten = below[:, first] + 0.5 * (below[:, last] - below[:, first])
    positive_weight = weights * positive
    with np.errstate(invalid="ignore", divide="ignore"):
        return (positive_weight * beaten).sum(1) / (positive_weight.sum(1) * negative_weight.sum(1))


def paired_auroc_difference(labels, probs_a, probs_b, n_resamples=1000, seed=0, level=0.95):
    """AUROC of model A minus that of model B on the same images (auroc()'s estimator: binary,
    or macro one-vs-rest over the classes present), with a paired percentile bootstrap interval:
    each resample scores both models on the same images, so what they share (which images are
    hard) cancels and the interval measures their difference only.

    Resamples that lack a class of the split are left out, as in bootstrap_ci. Returns
    {"auroc_a", "auroc_b", "difference", "interval": [low, high] at `level` or None,
    "n_resamples_used"}. Raises UserError when the split holds one class.
    """
    labels, probs_a = _as_numpy(labels, probs_a)
    probs_b = np.asarray(probs_b, dtype=np.float64)
    auroc_a, auroc_b = auroc(labels, probs_a), auroc(labels, probs_b)
    n = len(labels)
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1 / n), size=n_resamples)
    present = np.unique(labels)
    differences = resampled_auroc(labels, probs_a, counts) - resampled_auroc(labels, probs_b, counts)
    every_class = np.all([counts[:, labels == c].sum(1) > 0 for c in present], axis=0)
    used = differences[every_class]
    tail = (1 - level) / 2 * 100
    return {"auroc_a": auroc_a, "auroc_b": auroc_b, "difference": auroc_a - auroc_b,
            "interval": [float(v) for v in np.percentile(used, [tail, 100 - tail])] if len(used) else None,
            "n_resamples_used": int(len(used))}


def mcnemar_exact(only_a_right, only_b_right):
    """Two-sided p-value of McNemar's exact test that models A and B are equally accurate on the
    same images. Only the discordant images count (A right and B wrong, and the reverse): with
    equal accuracy each goes either way with probability 1/2, a binomial test (McNemar 1947; the
    exact form holds for any count, Fagerland et al. 2013). 1.0 when there are none.
    """
    discordant = only_a_right + only_b_right
    if discordant == 0:
        return 1.0
    return float(stats.binomtest(only_a_right, discordant, 0.5).pvalue)
