"""Train an image classifier from scratch on one task of a dataset.

Example: python train.py --data ../shared/data/landmarks --task source --out runs/source
Writes OUT/best.pt, OUT/last.pt, OUT/metrics.csv and OUT/curves.png.
"""
import torch

from lib import cli, distributed
from lib.data import load_split
from lib.engine import TrainConfig, best_epoch, config_from_args, cost_summary, fit
from lib.models import DEFAULT_MODEL, MODELS, STEMS, build_model, resolve_stem
from lib.plots import plot_curves

RECIPE = TrainConfig()


def get_args_parser():
    parser = cli.make_parser(__doc__)
    cli.add_data_args(parser)
    parser.add_argument("--model", choices=list(MODELS), default=DEFAULT_MODEL, help="architecture")
    parser.add_argument("--stem", choices=["auto", *STEMS["resnet"]], default="auto",
                        help="ResNets: 'stock' keeps torchvision's max-pool (4x fewer FLOPs), 'no-maxpool' "
                             "drops it; auto: no-maxpool under 128 px")
    cli.add_training_args(parser, RECIPE)
    cli.add_run_args(parser, "output folder for checkpoints, metrics.csv and curves.png")
    return parser


def main(args):
    device = distributed.pick_device(args.device)
    distributed.setup(device)
    out = cli.prepare_out_dir(args.out, overwrite=args.overwrite, resume=args.resume)
    train = load_split(args.data, "train", args.task, args.image_size, resize=args.resize, **cli.load_options(args))
    val = load_split(args.data, "val", args.task, args.image_size, resize=args.resize, **cli.load_options(args))
    mean, std = train.mean, train.std
    torch.manual_seed(args.seed)
    stem = resolve_stem(args.model, args.image_size, args.stem)
    model = build_model(args.model, len(train.classes), args.image_size, stem)
    config = config_from_args(args, device)
    describe = {"model": args.model, "stem": stem, "task": args.task, "classes": train.classes,
                "image_size": args.image_size, "resize": args.resize, "mean": mean, "std": std, "args": cli.plain_args(args)}
    if distributed.is_main():
        print(f"{args.model} on {args.task}: {len(train)} train / {len(val)} val images, "
              f"{len(train.classes)} classes, {device}, amp {'on' if config.amp else 'off'}")
    history = fit(model, train, val, describe=describe, config=config, out=out, device=device,
                  seed=args.seed, resume=args.resume)
    if distributed.is_main():
        plot_curves(history, out / "curves.png")
        best = best_epoch(history)
        print(f"best epoch {best['epoch']}: val accuracy {best['val_accuracy']:.4f}, "
              f"val AUROC {best['val_auroc']:.4f} -> {out / 'best.pt'}; {cost_summary(history)}")
    distributed.cleanup()


if __name__ == "__main__":
    cli.run(main, get_args_parser())
