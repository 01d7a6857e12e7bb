"""Figures written by the scripts (matplotlib, no display needed); every file is written atomically."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lib.checkpoint import atomic_write  # noqa: E402


def save_figure(fig, path):
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)


def plot_curves(history, path):
    """Loss, accuracy and AUROC per epoch, train and validation."""
    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, metric in zip(axes, ["loss", "accuracy", "auroc"]):
        for part in ("train", "val"):
            ax.plot(epochs, [row[f"{part}_{metric}"] for row in history], marker=".", label=part)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)
