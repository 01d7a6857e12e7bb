"""Evaluate a checkpoint (or an exported .onnx model) on one split of a dataset.

Example: python evaluate.py --checkpoint runs/target/best.pt --data ../shared/data/landmarks --split val --out runs/target/eval
A labelled split gets OUT/metrics.json (with 95% bootstrap intervals), roc.png, confusion.png,
predictions.csv and mistakes.png; an unlabelled one (challenge) gets predictions.csv only.
Images are read at the model's size, --task defaults to the checkpoint's task, and the data's
class names must be the model's, in any order (results are in the model's order).
"""
from pathlib import Path

from lib import cli, distributed, evaluation, flags
from lib.data import SPLITS, load_split, match_classes
from lib.errors import UserError
from lib.files import write_json

OUTPUTS = ("metrics.json", "predictions.csv", "roc.png", "confusion.png", "mistakes.png")


def get_args_parser():
    parser = cli.make_parser(__doc__)
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint from train.py/transfer.py, or an exported .onnx model")
    flags.add_data_args(parser, image_size=False)
    parser.add_argument("--split", choices=SPLITS, default="test",
                        help="split to evaluate; an unlabelled one (challenge) gets predictions only")
    parser.add_argument("--tta", action="store_true",
                        help="average the predictions for each image and its horizontal mirror")
    parser.add_argument("--json", type=Path, metavar="FILE",
                        help="also write the metrics to FILE, e.g. to compare runs in a shell loop")
    cli.add_run_args(parser, "output folder for metrics.json, predictions.csv and the plots",
                     seed_help="seed of the bootstrap resampling")
    return parser


def main(args):
    device = distributed.pick_device(args.device)
    out = cli.prepare_out_dir(args.out, OUTPUTS, overwrite=args.overwrite)
    if args.json and args.json.exists() and not args.overwrite:
        raise UserError(f"--json {args.json}: already exists; use --overwrite to replace it")
    if args.json:
        cli.make_folder(args.json.parent, "--json")
    predictor = evaluation.load_predictor(args.checkpoint, device)
    task = args.task or predictor.task
    facts = predictor.preprocessing
    split = load_split(args.data, args.split, task, facts.image_size, resize=facts.resize, **cli.load_options(args))
    classes = list(facts.classes)
    if split.labels is not None or split.classes:
        split = match_classes(split, classes, f"--data {args.data} (task {task}) and --checkpoint {args.checkpoint}")
    if split.labels is None and args.json:
        raise UserError(f"--json {args.json}: split {args.split!r} has no labels, so there are no metrics")
    probs = predictor.predict(split.images, tta=args.tta)
    labels = None if split.labels is None else split.labels.numpy()
    evaluation.write_predictions(out / "predictions.csv", split.filenames, probs, classes, labels)
    if labels is None:
        print(f"{len(split)} unlabelled images of split {args.split!r}: predictions -> {out / 'predictions.csv'}")
        return
    report = {"checkpoint": str(args.checkpoint), "data": str(args.data), "task": task, "split": args.split,
              "tta": args.tta, **evaluation.build_report(labels, probs, classes, seed=args.seed)}
    print(f"{args.checkpoint} on split {args.split!r}{' with TTA' if args.tta else ''}:")
    print(evaluation.format_report(report))
    write_json(report, out / "metrics.json")
    if args.json:
        write_json(report, args.json)
    from lib.plots import plot_confusion, plot_mistakes, plot_roc  # matplotlib: only a labelled split needs it

    plot_roc(labels, probs, classes, out / "roc.png")
    plot_confusion(report["confusion_matrix"], classes, out / "confusion.png")
    plot_mistakes(split.images, labels, probs, classes, split.filenames, out / "mistakes.png")
    print(f"metrics.json, predictions.csv, roc.png, confusion.png, mistakes.png -> {out}")


if __name__ == "__main__":
    cli.run(main, get_args_parser())
