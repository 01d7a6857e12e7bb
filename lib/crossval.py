"""k-fold cross-validation of a transfer recipe over a task's labelled images (train and val pooled).

A small val split saturates (the landmarks' 140 target images give AUROC 0.999 to most recipes),
so it cannot rank recipes; k folds give every labelled image one held-out prediction. Each fold
trains the recipe on k-1 parts and reports the held-out part at the last epoch: the held-out
images never choose an epoch or stop training, so the figure is not flattered by selection.
The folds are stratified and depend only on --seed and the images, so two recipes run with
the same seed are compared on the same folds.
"""
import statistics

import torch
from sklearn.model_selection import StratifiedKFold

from lib.data import ImageRows, Split
from lib.errors import UserError

COLUMNS = ["fold", "train_images", "heldout_images", "loss", "accuracy", "auroc", "epochs", "tflop", "seconds"]


def pool(*splits):
    """One Split of several labelled splits of the same task; its images index theirs (no copy)."""
    classes = splits[0].classes
    if any(part.classes != classes for part in splits):
        raise UserError("the splits to pool have different classes")
    return Split(ImageRows([part.images for part in splits]), torch.cat([part.labels for part in splits]),
                 classes, [name for part in splits for name in part.filenames])


def folds(split, k, seed):
    """(train Split, held-out Split) for each of k stratified folds."""
    counts = torch.bincount(split.labels, minlength=len(split.classes))
    if k < 2 or k > int(counts.min()):
        raise UserError(f"--folds {k}: must be from 2 to the smallest class's image count ({int(counts.min())})")
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for train_index, heldout_index in splitter.split(split.labels.numpy(), split.labels.numpy()):
        yield _subset(split, train_index), _subset(split, heldout_index)


def _subset(split, index):
    """The rows `index` of a pooled split, as a view of its images (no copy)."""
    index = torch.as_tensor(index)
    return Split(split.images.subset(index), split.labels[index], split.classes,
                 [split.filenames[i] for i in index])


def fold_row(fold, train, heldout, history):
    last = history[-1]
    return {"fold": fold, "train_images": len(train), "heldout_images": len(heldout),
            "loss": last["val_loss"], "accuracy": last["val_accuracy"], "auroc": last["val_auroc"],
            "epochs": len(history), "tflop": last["total_tflop"], "seconds": sum(r["seconds"] for r in history)}


def summarise(rows):
    """Mean and standard deviation over folds of each held-out metric."""
    return {metric: {"mean": statistics.mean(r[metric] for r in rows),
                     "sd": statistics.stdev(r[metric] for r in rows) if len(rows) > 1 else 0.0}
            for metric in ("loss", "accuracy", "auroc")} | {"folds": len(rows),
                                                           "tflop": sum(r["tflop"] for r in rows)}


def format_table(rows, summary):
    lines = [f"{'fold':>4} {'train':>6} {'held out':>8} {'loss':>7} {'accuracy':>8} {'AUROC':>7} {'TFLOP':>7}"]
    for r in rows:
        lines.append(f"{r['fold']:>4} {r['train_images']:>6} {r['heldout_images']:>8} {r['loss']:>7.4f} "
                     f"{r['accuracy']:>8.4f} {r['auroc']:>7.4f} {r['tflop']:>7.2f}")
    mean = {m: summary[m]["mean"] for m in ("loss", "accuracy", "auroc")}
    sd = {m: summary[m]["sd"] for m in ("loss", "accuracy", "auroc")}
    lines.append(f"{'mean':>4} {'':>6} {'':>8} {mean['loss']:>7.4f} {mean['accuracy']:>8.4f} {mean['auroc']:>7.4f} "
                 f"{summary['tflop']:>7.2f}")
    lines.append(f"{'sd':>4} {'':>6} {'':>8} {sd['loss']:>7.4f} {sd['accuracy']:>8.4f} {sd['auroc']:>7.4f}")
    return "\n".join(lines)
