"""Train an image classifier from scratch on one task of a dataset.

Example: python train.py --data ../shared/data/landmarks --task source --out runs/source
Writes OUT/model.pt (the checkpoint --select recommends), OUT/best.pt, OUT/last.pt,
OUT/metrics.csv and OUT/curves.png.
"""
import torch

from lib import cli, distributed
from lib.data import channel_stats, load_split
from lib.engine import cost_summary, fit, recall_summary
from lib.models import DEFAULT_MODEL, MODELS, STEMS, build_model, resolve_stem
from lib.plots import plot_curves
from lib.recipe import TrainConfig, config_from_args
from lib.selection import chosen_row

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
    train = load_split(args.data, "train", args.task, args.image_size, args.skip_bad_images)
    val = load_split(args.data, "val", args.task, args.image_size, args.skip_bad_images)
    mean, std = channel_stats(train.images)
    torch.manual_seed(args.seed)
    stem = resolve_stem(args.model, args.image_size, args.stem)
    model = build_model(args.model, len(train.classes), args.image_size, stem)
    config = config_from_args(args, device)
    describe = {"model": args.model, "stem": stem, "task": args.task, "classes": train.classes,
                "image_size": args.image_size, "mean": mean, "std": std, "args": cli.plain_args(args)}
    if distributed.is_main():
        print(f"{args.model} on {cli.data_name(args.data, args.task)}: {len(train)} train / {len(val)} val images, "
              f"{len(train.classes)} classes, {device}, amp {'on' if config.amp else 'off'}")
    history = fit(model, train, val, describe=describe, config=config, out=out, device=device,
                  seed=args.seed, resume=args.resume)
    if distributed.is_main():
        plot_curves(history, out / "curves.png")
        chosen = chosen_row(history, config)
        print(recall_summary(out / "model.pt"))
        print(f"{out / 'model.pt'}: epoch {chosen['epoch']} (--select {config.select}), val accuracy "
              f"{chosen['val_accuracy']:.4f}, balanced accuracy {chosen['val_balanced_accuracy']:.4f}, "
              f"AUROC {chosen['val_auroc']:.4f}; {cost_summary(history)}")
    distributed.cleanup()


if __name__ == "__main__":
    cli.run(main, get_args_parser())
