"""Figures written by the scripts (matplotlib, no display needed); every file is written atomically."""
import math
import re
from pathlib import Path

import matplotlib
import numpy as np
from sklearn.metrics import auc, roc_curve

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from lib.files import atomic_write  # noqa: E402


def save_figure(fig, path):
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)


def plot_curves(history, path):
    """Loss, accuracy and AUROC per epoch, train and validation (validated epochs only)."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, metric in zip(axes, ["loss", "accuracy", "auroc"]):
        for part in ("train", "val"):
            rows = [row for row in history if row[f"{part}_{metric}"] is not None]
            ax.plot([row["epoch"] for row in rows], [row[f"{part}_{metric}"] for row in rows], marker=".",
                    label=part)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)


def plot_roc(labels, probs, classes, path):
    """One-vs-rest ROC curve per class; a binary task shows the curve of class 1 only."""
    shown = [1] if len(classes) == 2 else range(len(classes))
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for c in shown:
        positives = labels == c
        if positives.all() or not positives.any():
            continue
        fpr, tpr, _ = roc_curve(positives, probs[:, c])
        ax.plot(fpr, tpr, label=f"{classes[c]} (AUC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    if ax.get_legend_handles_labels()[0]:
        ax.set_title("ROC")
        ax.legend(loc="lower right", fontsize="small")
    else:  # a split of one class has no negatives, so no curve
        ax.set_title("ROC: none, the split holds one class")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_confusion(matrix, classes, path):
    """Counts, true classes as rows; each cell also shows its share of the row."""
    matrix = np.asarray(matrix)
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    side = 2.5 + 0.6 * len(classes)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{matrix[i, j]}\n{shares[i, j]:.0%}", ha="center", va="center", fontsize=8,
                    color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of true class")
    save_figure(fig, path)


def plot_mistakes(images, labels, probs, classes, filenames, path, count=16):
    """The wrongly classified images with the highest loss, as fastai's plot_top_losses."""
    wrong = np.flatnonzero(probs.argmax(1) != labels)
    losses = -np.log(np.clip(probs[wrong, labels[wrong]], 1e-12, None))
    worst = wrong[np.argsort(-losses, kind="stable")][:count]
    columns = min(max(len(worst), 1), 4)
    rows = max((len(worst) + columns - 1) // columns, 1)
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    if not len(worst):
        axes[0, 0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    for ax, i in zip(axes.flat, worst):
        predicted = probs[i].argmax()
        ax.imshow(images[i].permute(1, 2, 0).numpy())
        ax.set_title(f"{classes[predicted]} {probs[i, predicted]:.2f}\ntrue {classes[labels[i]]}\n{filenames[i]}",
                     fontsize=8)
    fig.suptitle("most confidently wrong: predicted (probability), true class, file")
    save_figure(fig, path)


def plot_sweep(rows, histories, path):
    """Validation AUROC and accuracy per epoch for each number of frozen stages."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, metric in zip(axes, ["auroc", "accuracy"]):
        for row in rows:
            history = [r for r in histories[row["frozen_stages"]] if r["val_loss"] is not None]
            ax.plot([r["epoch"] for r in history], [r[f"val_{metric}"] for r in history], marker=".",
                    label=f"freeze {row['frozen_stages']} ({row['trainable_params']:,} trainable)")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"val {metric}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    save_figure(fig, path)


def write_cam_figures(split, explanations, method, out):
    """explain.py's figures of lib.cam.Explanation's maps: OUT/grid.png and OUT/images/NNN_<name>.png
    (original | overlay per model); returns the per-image paths."""
    titles = panel_titles(split, explanations)
    maps = [e.heatmaps for e in explanations]
    caption = method + ": " + "   ".join(
        f"{e.label}{'/'.join(Path(e.source['checkpoint']).parts[-2:])} at {'+'.join(e.layers)}" for e in explanations)
    save_figure(draw_cam_figure(split.images, maps, titles, caption), out / "grid.png")
    folder = out / "images"
    folder.mkdir(exist_ok=True)
    for stale in folder.glob("[0-9][0-9][0-9]_*.png"):
        stale.unlink()
    paths = []
    for i, filename in enumerate(split.filenames):
        path = folder / (_file_stem(i, filename) + ".png")
        save_figure(draw_cam_figure(split.images[i:i + 1], [m[i:i + 1] for m in maps], titles[i:i + 1]),
                    path)
        paths.append(path)
    return paths


def panel_titles(split, explanations):
    """Per image: the original's title (true label) and one title per model (prediction, map class)."""
    classes = split.classes
    titles = []
    for i in range(len(split)):
        true = "?" if split.labels is None else classes[int(split.labels[i])]
        row = [f"true: {true}"]
        for e in explanations:
            pred = int(e.probs[i].argmax())
            text = f"{e.label}pred: {classes[pred]} ({float(e.probs[i, pred]):.2f})"
            if int(e.targets[i]) != pred:
                text += f"\nmap of {classes[int(e.targets[i])]}"
            row.append(text)
        titles.append(row)
    return titles


def grid_layout(num_images, panels_per_image, max_columns=8):
    """(rows, columns) of axes: whole images per row, each image's panels side by side."""
    per_row = max(1, max_columns // panels_per_image)
    return max(1, math.ceil(num_images / per_row)), min(max(num_images, 1), per_row) * panels_per_image


def draw_cam_figure(images, heatmaps_per_model, titles, caption=None, max_columns=8):
    """Each image as original | overlay per model, under an optional caption; returns the figure."""
    panels = 1 + len(heatmaps_per_model)
    rows, cols = grid_layout(len(images), panels, max_columns)
    fig, axes = plt.subplots(rows, cols, figsize=(2.0 * cols, 2.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    per_row = cols // panels
    for i, image in enumerate(images.permute(0, 2, 3, 1).numpy()):
        first = (i // per_row, (i % per_row) * panels)
        for p in range(panels):
            ax = axes[first[0], first[1] + p]
            ax.imshow(image)
            if p:
                ax.imshow(heatmaps_per_model[p - 1][i], cmap="jet", alpha=0.45, vmin=0, vmax=1)
            ax.set_title(titles[i][p], fontsize=7)
    fig.tight_layout()
    if caption:
        fig.suptitle(caption, fontsize=8, y=1.0, va="bottom")
    return fig


def _file_stem(index, filename):
    return f"{index:03d}_" + re.sub(r"[^A-Za-z0-9_.-]", "_", Path(filename).stem)
