"""Plot the recipe comparison: source val accuracy and AUROC against training compute and time.

Example: python bench/plot_recipes.py docs/recipes.csv docs/recipes.png
The CSV has one row per run: setting, seed, val_accuracy, val_auroc, tflop, seconds and role
("new default", "old default" or empty). Each setting is one point (the mean over its seeds)
with a bar from its lowest to its highest seed; the two defaults are marked.
"""
import csv
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib import cli  # noqa: E402
from lib.errors import UserError  # noqa: E402
from lib.plots import plt, save_figure  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

MARKERS = {"new default": ("*", "tab:red"), "old default": ("s", "tab:gray")}


def get_args_parser():
    parser = cli.make_parser(__doc__)
    parser.add_argument("csv", type=Path, help="one row per run (see above)")
    parser.add_argument("png", type=Path, help="the figure to write")
    return parser


def settings(rows):
    """{setting: {"role", and per column the list over seeds}} in the CSV's order."""
    grouped = {}
    for row in rows:
        entry = grouped.setdefault(row["setting"], {"role": row["role"], "runs": []})
        entry["runs"].append({k: float(row[k]) for k in ("val_accuracy", "val_auroc", "tflop", "seconds")})
    return grouped


def main(args):
    if not args.csv.is_file():
        raise UserError(f"{args.csv}: no such file")
    with open(args.csv, newline="") as f:
        grouped = settings(list(csv.DictReader(f)))
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for row, metric in enumerate(("val_accuracy", "val_auroc")):
        for col, cost in enumerate(("tflop", "seconds")):
            ax = axes[row][col]
            for name, entry in grouped.items():
                values = [run[metric] for run in entry["runs"]]
                x = statistics.mean(run[cost] for run in entry["runs"])
                y = statistics.mean(values)
                marker, colour = MARKERS.get(entry["role"], ("o", "tab:blue"))
                ax.errorbar([x], [y], yerr=[[y - min(values)], [max(values) - y]], fmt=marker, color=colour,
                            markersize=12 if entry["role"] else 6, capsize=3)
                label = f"{name} ({entry['role']})" if entry["role"] else name
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=7)
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.margins(x=0.35)
            ax.set_xlabel("training TFLOP (log)" if cost == "tflop" else "float32 seconds here (log)")
            ax.set_ylabel(f"source {metric.replace('_', ' ')}")
            ax.grid(alpha=0.3, which="both")
    fig.suptitle("Source task, val split: mean over seeds, bars from the lowest to the highest seed")
    save_figure(fig, args.png)
    print(f"{len(grouped)} settings -> {args.png}")


if __name__ == "__main__":
    cli.run(main, get_args_parser())
