"""Train an image classifier on one task of a dataset, from scratch or from a state_dict you have.

Example: python train.py --data ../shared/data/landmarks --task source --out runs/source
From weights you have: python train.py --data photos --model mobilenet_v3_small --weights mnv3s.pth \
    --mean 0.485 0.456 0.406 --std 0.229 0.224 0.225 --image-size 128 --out runs/mnv3s
Writes OUT/model.pt (the checkpoint --select recommends), OUT/best.pt, OUT/last.pt,
OUT/metrics.csv and OUT/curves.png.
"""
import torch

from lib import cli, distributed, unlabelled
from lib.checkpoint import data_lineage
from lib.data import load_datasets
from lib.engine import fit, run_report
from lib.errors import UserError
from lib.models import DEFAULT_MODEL, MODELS, STEMS, build_model, describe_models, resolve_stem
from lib.plots import plot_curves
from lib.recipe import TrainConfig, config_from_args
from lib.weights import load_weights

RECIPE = TrainConfig()


def get_args_parser():
    parser = cli.make_parser(__doc__, epilog=describe_models())
    cli.add_data_args(parser, several=True)
    parser.add_argument("--model", choices=list(MODELS), default=DEFAULT_MODEL, metavar="NAME",
                        help="architecture: fastnet, cnn3 or any torchvision classification model (listed below); "
                             "fastnet is the most accurate from scratch at 64 and 128 px alike (README: the 128-px "
                             "table), so the default does not depend on --image-size")
    parser.add_argument("--stem", choices=["auto", *STEMS], default="auto",
                        help="ResNets: 'stock' keeps torchvision's max-pool (4x fewer FLOPs), 'no-maxpool' "
                             "drops it; auto: no-maxpool under 128 px")
    parser.add_argument("--weights", metavar="FILE",
                        help="start from this torchvision-format state_dict (torch.save(model.state_dict())) of "
                             "the same architecture; its classifier is replaced for the task's classes")
    parser.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"),
                        help="per-channel mean of pixels scaled to [0, 1], e.g. ImageNet's 0.485 0.456 0.406 "
                             "with weights trained on it (None: the training split's)")
    parser.add_argument("--std", type=cli.positive_float, nargs=3, metavar=("R", "G", "B"),
                        help="per-channel standard deviation, as --mean; ImageNet's is 0.229 0.224 0.225 "
                             "(None: the training split's)")
    cli.add_training_args(parser, RECIPE)
    cli.add_run_args(parser, "output folder for checkpoints, metrics.csv and curves.png")
    return parser


def main(args):
    if (args.mean is None) != (args.std is None):
        raise UserError("--mean and --std: give both (the statistics the weights were trained with) or neither")
    device = distributed.pick_device(args.device)
    distributed.setup(device)
    out = cli.prepare_out_dir(args.out, overwrite=args.overwrite, resume=args.resume)
    train = load_datasets(args.data, "train", args.task, args.image_size, resize=args.resize, **cli.load_options(args))
    val = load_datasets(args.data, "val", args.task, args.image_size, resize=args.resize, **cli.load_options(args))
    mean, std = (args.mean, args.std) if args.mean else (train.mean, train.std)
    torch.manual_seed(args.seed)
    stem = resolve_stem(args.model, args.image_size, args.stem)
    model = build_model(args.model, len(train.classes), args.image_size, stem)
    config = config_from_args(args, device)
    describe = {"model": args.model, "stem": stem, "task": args.task, "classes": train.classes,
                "image_size": args.image_size, "resize": args.resize, "mean": mean, "std": std,
                "args": cli.plain_args(args), "lineage": data_lineage(args.data)}
    fixmatch = unlabelled.setup(args.unlabelled, args.data, args.task, args.image_size, args.resize, config,
                                **cli.load_options(args))
    if fixmatch:
        describe["unlabelled"] = fixmatch.entry
    if args.weights:
        describe["lineage"].update(load_weights(model, args.model, args.weights))
    if distributed.is_main():
        print(f"{args.model} on {cli.data_name(args.data, args.task)}: {len(train)} train / {len(val)} val images, "
              f"{len(train.classes)} classes, {device}, amp {'on' if config.amp else 'off'}")
        print(f"weights: {'from ' + args.weights + ' (all but the head)' if args.weights else 'random'}; "
              f"normalising with mean {_triple(mean)} std {_triple(std)} "
              f"({'--mean/--std' if args.mean else 'the training split'})")
        if fixmatch:
            print(fixmatch.summary())
    history = fit(model, train, val, describe=describe, config=config, out=out, device=device,
                  seed=args.seed, resume=args.resume, unlabelled=fixmatch)
    if distributed.is_main():
        plot_curves(history, out / "curves.png")
        print(run_report(out, history, config))
    distributed.cleanup()


def _triple(values):
    return " ".join(f"{v:.3f}" for v in values)


if __name__ == "__main__":
    cli.run(main, get_args_parser())
