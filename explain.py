"""Grad-CAM heatmaps of a trained model, and where their mass falls (the sky or the building).

Example: python explain.py --checkpoint runs/target/best.pt --data DIR --task target --out runs/target/cam
Side by side: python explain.py --compare runs/a/best.pt runs/b/best.pt --data DIR --task target --out cam_ab
Writes OUT/grid.png, OUT/images/NNN_<name>.png (original | overlay per image) and OUT/cam_stats.json,
and prints each model's attention summary. Image size, mean, std and classes come from the checkpoint.
An ensemble checkpoint is explained at the layer(s) of every member, for the ensemble's prediction.
"""
from pathlib import Path

from lib import cam, cli, distributed, flags, image_sets, plots
from lib.checkpoint import build_from_checkpoint, file_hash, load_checkpoint, read_preprocessing
from lib.data import SPLITS, match_classes
from lib.ensemble import in_class_order
from lib.errors import UserError
from lib.files import write_json

OUTPUTS = ("grid.png", "images", "cam_stats.json")


def get_args_parser():
    parser = cli.make_parser(__doc__)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="the checkpoint to explain")
    which.add_argument("--compare", nargs=2, metavar=("CKPT_A", "CKPT_B"),
                       help="explain the same images with two checkpoints (the same class names, in any order), "
                            "side by side")
    flags.add_data_args(parser, image_size=False, data_required=False)
    group = parser.add_argument_group("explanation")
    group.add_argument("--split", choices=SPLITS, default="val", help="which split of --data to explain")
    group.add_argument("--num-images", type=cli.non_negative_int, default=16,
                       help="a seeded random sample of this many images of the split; 0 for all")
    group.add_argument("--images", nargs="+", metavar="FILE", type=Path,
                       help="explain these image files instead of a split of --data")
    group.add_argument("--method", choices=list(cam.METHODS), default=cam.DEFAULT_METHOD,
                       help="CAM method; hirescam weighs each position by its own gradient, where gradcam "
                            "averages the gradient over positions and can leave maps blank on models whose "
                            "head does not average (fastnet's max-pool, cnn3; docs/explain.md)")
    group.add_argument("--target-class",
                       help="class name or index whose map to draw; if not given, each image's predicted class")
    group.add_argument("--layer", nargs="+", metavar="NAME",
                       help="target layer(s) by module name, dotted for inner ones (e.g. layer4.1); several "
                            "are averaged (in an ensemble: these layers of every member); if not given, "
                            "the model's own (train.py --help lists them; "
                            "e.g. layer3 for ResNets, the last block at 1/16 resolution for MobileNets)")
    group.add_argument("--sanity", action="store_true",
                       help="also correlate the maps with those of the same model re-initialised "
                            "(Adebayo et al. 2018); near 0 is good")
    cli.add_run_args(parser, "output folder for grid.png, images/ and cam_stats.json",
                     seed_help="seed for the image sample and for --sanity's re-initialised weights")
    return parser


def main(args):
    paths = args.compare or [args.checkpoint]
    checkpoints = [load_checkpoint(path) for path in paths]
    first = checkpoints[0]
    checkpoints[1:] = [in_class_order(checkpoint, first["classes"], f"--compare {path}", (str(paths[0]), str(path)))
                       for path, checkpoint in zip(paths[1:], checkpoints[1:])]
    facts = [read_preprocessing(checkpoint, where=f"checkpoint {path}") for path, checkpoint in zip(paths, checkpoints)]
    for path, other in zip(paths[1:], facts[1:]):
        if (other.image_size, other.resize) != (facts[0].image_size, facts[0].resize):
            raise UserError(f"--compare {path}: its image size or resize policy differs from {paths[0]}'s, "
                            "so the same images cannot be explained by both")
    device = distributed.pick_device(args.device)
    out = cli.prepare_out_dir(args.out, OUTPUTS, overwrite=args.overwrite)
    split = image_sets.load_images(args.images, args.data, args.task, args.split, args.num_images, args.seed,
                                   facts[0].image_size, first["classes"], facts[0].resize, **cli.load_options(args))
    split = match_classes(split, first["classes"], f"--data {args.data} and {paths[0]}")
    target = cam.class_index(args.target_class, first["classes"])

    explanations = []
    for i, (path, checkpoint) in enumerate(zip(paths, checkpoints)):
        label = f"{'AB'[i]}: " if args.compare else ""
        model = build_from_checkpoint(checkpoint, where=f"checkpoint {path}")
        layers = cam.target_layers(model, checkpoint["model"], args.layer)
        explanations.append(cam.explain_checkpoint(
            label, {"checkpoint": str(path), "sha256": file_hash(path)}, checkpoint, model, split.images,
            device, args.method, layers, target, sanity_seed=args.seed if args.sanity else None))

    plots.write_cam_figures(split, explanations, args.method, out)
    write_json(cam.stats_record(split, explanations, args.method), out / "cam_stats.json")
    for explanation in explanations:
        if explanation.label:
            print(f"{explanation.label}{explanation.source['checkpoint']}")
    for explanation in explanations:
        print(cam.format_summary(explanation, args.method))
    print(f"wrote {out / 'grid.png'}, {len(split)} image(s) in {out / 'images'}, {out / 'cam_stats.json'}")


if __name__ == "__main__":
    cli.run(main, get_args_parser())
