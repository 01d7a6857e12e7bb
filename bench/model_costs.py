"""Parameters and inference GFLOP per image of every model (or those named), at each size.

Example: python bench/model_costs.py --sizes 64 128 --models fastnet mobilenet_v3_small resnet18
Counts are lib.flops's (torch.utils.flop_counter; a multiply-add is two FLOPs) on models built
on the meta device, so even the largest costs no memory or arithmetic (about a CPU-minute for
all of them) and the counts are the same on every machine. "-" marks a size the model does not
run at (train.py's one-line refusal says why). Parameters are counted at the largest size the
model runs at (they depend on it for ViT and cnn3). Prints a Markdown table, cheapest at the
last size first.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lib import cli  # noqa: E402
from lib.errors import UserError  # noqa: E402
from lib.flops import inference_flops  # noqa: E402
from lib.models import MODELS, build_model, meta_device  # noqa: E402


def get_args_parser():
    parser = cli.make_parser(__doc__)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS), metavar="NAME",
                        help="models to count (default: all)")
    parser.add_argument("--sizes", nargs="+", type=cli.positive_int, default=[64, 128], help="input sides in px")
    parser.add_argument("--classes", type=cli.positive_int, default=8, help="classes of the head")
    return parser


def costs(name, size, classes):
    """(parameters, inference GFLOP per image) at `size` px, None where the model does not run at it."""
    try:
        with meta_device():
            model = build_model(name, classes, size)
        return sum(p.numel() for p in model.parameters()), inference_flops(model, size) / 1e9
    except (UserError, RuntimeError, ValueError, AssertionError):
        return None


def main(args):
    rows = []
    for name in args.models:
        counted = [costs(name, size, args.classes) for size in args.sizes]
        params = next((c[0] for c in reversed(counted) if c), None)
        rows.append((name, params, [c and c[1] for c in counted]))
    rows.sort(key=lambda row: [float("inf") if g is None else g for g in reversed(row[2])])
    print(f"| model | parameters (M, {args.classes} classes) | "
          + " | ".join(f"GFLOP at {s} px" for s in args.sizes) + " |")
    print("|---|---:|" + "---:|" * len(args.sizes))
    for name, params, gflops in rows:
        cells = " | ".join("-" if g is None else f"{g:.3f}" for g in gflops)
        print(f"| {name} | {'-' if params is None else f'{params / 1e6:.2f}'} | {cells} |")


if __name__ == "__main__":
    cli.run(main, get_args_parser())
