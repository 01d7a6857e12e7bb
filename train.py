"""Train an image classifier on one task of a dataset, from scratch or from a state_dict you have.

Example: python train.py --data ../shared/data/landmarks --task source --out runs/source
From torchvision's ImageNet weights (their mean, std and 224 px unless told otherwise):
    python train.py --data photos --model mobilenet_v3_small --weights DEFAULT --out runs/mnv3s
From weights you have: python train.py --data photos --model mobilenet_v3_small --weights mnv3s.pth \
    --mean 0.485 0.456 0.406 --std 0.229 0.224 0.225 --image-size 128 --out runs/mnv3s
Writes OUT/model.pt (the checkpoint --select recommends), OUT/best.pt, OUT/last.pt,
OUT/metrics.csv and OUT/curves.png.
"""
import torch

from lib import cli, distill, distributed, flags, unlabelled, weights
from lib.checkpoint import data_lineage
from lib.data import load_datasets, photo_side
from lib.engine import fit, run_report
from lib.errors import UserError
from lib.models import DEFAULT_MODEL, MODELS, STEMS, build_model, describe_models, resolve_stem
from lib.plots import plot_curves
from lib.recipe import RECIPES, config_from_args


def get_args_parser():
    parser = cli.make_parser(__doc__, epilog=describe_models())
    flags.add_data_args(parser, size_chosen=True, several=True)
    parser.add_argument("--model", choices=list(MODELS), default=DEFAULT_MODEL, metavar="NAME",
                        help="architecture: fastnet, cnn3 or any torchvision classification model (listed below); "
                             "fastnet is the most accurate from scratch at 64 and 128 px alike (README: the 128-px "
                             "table), so the default does not depend on --image-size")
    parser.add_argument("--stem", choices=["auto", *STEMS], default="auto",
                        help="ResNets: 'stock' keeps torchvision's max-pool (4x fewer FLOPs), 'no-maxpool' "
                             "drops it; auto: no-maxpool under 128 px")
    parser.add_argument("--weights", metavar="NAME|FILE",
                        help="start from torchvision's published weights for --model by name (DEFAULT, "
                             "IMAGENET1K_V1, ...: torchvision.models.get_model_weights(MODEL) lists them, and so "
                             "does the refusal of a name the model lacks), read from torchvision's cache "
                             "($TORCH_HOME/hub/checkpoints) or downloaded into it; or from a torchvision-format "
                             "state_dict file (torch.save(model.state_dict())) of the same architecture. The "
                             "classifier is replaced for the task's classes")
    parser.add_argument("--mean", type=cli.finite_float, nargs=3, metavar=("R", "G", "B"),
                        help="per-channel mean of pixels scaled to [0, 1], e.g. ImageNet's 0.485 0.456 0.406 "
                             "with weights trained on it (None: published --weights' own, else the training split's)")
    parser.add_argument("--std", type=cli.positive_float, nargs=3, metavar=("R", "G", "B"),
                        help="per-channel standard deviation, as --mean; ImageNet's is 0.229 0.224 0.225 "
                             "(None: published --weights' own, else the training split's)")
    flags.add_training_args(parser, RECIPES["train"])
    cli.add_run_args(parser, "output folder for checkpoints, metrics.csv and curves.png")
    return parser


def main(args):
    if (args.mean is None) != (args.std is None):
        raise UserError("--mean and --std: give both (the statistics the weights were trained with) or neither")
    device = distributed.pick_device(args.device)
    distributed.setup(device)
    start = weights.open_weights(args.model, args.weights) if args.weights else None
    out = cli.prepare_out_dir(args.out, cli.RUN_OUTPUTS, overwrite=args.overwrite, resume=args.resume)
    photos = None if args.image_size or (start and start.image_size) else photo_side(args.data, args.task)
    image_size, size_reason = weights.image_size_for(args.image_size, start, photos)
    train = load_datasets(args.data, "train", args.task, image_size, resize=args.resize, **cli.load_options(args))
    val = load_datasets(args.data, "val", args.task, image_size, resize=args.resize, **cli.load_options(args))
    mean, std, whose = weights.normalisation(args.mean, args.std, start, train)
    torch.manual_seed(args.seed)
    stem = resolve_stem(args.model, image_size, args.stem)
    model = build_model(args.model, len(train.classes), image_size, stem)
    config = config_from_args(args, device)
    describe = {"model": args.model, "stem": stem, "task": args.task, "classes": train.classes,
                "image_size": image_size, "resize": args.resize, "mean": mean, "std": std,
                "args": {**cli.plain_args(args), "image_size": image_size}, "lineage": data_lineage(args.data)}
    fixmatch = unlabelled.setup(args.unlabelled, args.data, args.task, image_size, args.resize, config,
                                **cli.load_options(args))
    if fixmatch:
        describe["unlabelled"] = fixmatch.entry
    teacher = distill.load_teacher(args.teacher, config.teacher_weight, train.classes, args.resize, device)
    if teacher:
        describe["teacher"] = teacher.entry
    if start:
        describe["lineage"].update(weights.load_weights(model, args.model, start))
    if distributed.is_main():
        print(f"{args.model} on {cli.data_name(args.data, args.task)}: {len(train)} train / {len(val)} val images, "
              f"{len(train.classes)} classes, {device}, amp {'on' if config.amp else 'off'}")
        print(f"image size {image_size} px ({size_reason})")
        print(f"weights: {start.described + ' (all but the head)' if start else 'random'}; "
              f"normalising with mean {_triple(mean)} std {_triple(std)} ({whose})")
        if fixmatch:
            print(fixmatch.summary())
        if teacher:
            print(teacher.summary())
    history = fit(model, train, val, describe=describe, config=config, out=out, device=device,
                  seed=args.seed, resume=args.resume, unlabelled=fixmatch, teacher=teacher)
    if distributed.is_main():
        plot_curves(history, out / "curves.png")
        print(run_report(out, history, config))
    distributed.cleanup()


def _triple(values):
    return " ".join(f"{v:.3f}" for v in values)


if __name__ == "__main__":
    cli.run(main, get_args_parser())
