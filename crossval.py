"""Cross-validate a transfer recipe: k stratified folds over the task's labelled images (train + val).

Example: python crossval.py --source runs/source/best.pt --data ../shared/data/landmarks --task target --out runs/cv
Takes transfer.py's options. Each fold trains on k-1 parts into OUT/fold-N/ and is scored on the
held-out part at its last epoch (no early stopping, no epoch chosen on held-out images).
Writes OUT/crossval.csv (one row per fold) and OUT/crossval.json (means and standard deviations).
Recipes run with the same --seed and data see the same folds.
"""
import dataclasses

from lib import cli, crossval, distributed, transfer
from lib.data import load_split
from lib.engine import config_from_args, fit
from lib.files import write_csv, write_json


def get_args_parser():
    parser = cli.make_parser(__doc__)
    transfer.add_transfer_args(parser, sweep=False)
    parser.add_argument("--folds", type=cli.positive_int, default=5, help="number of folds")
    cli.add_run_args(parser, "output folder for the folds' runs, crossval.csv and crossval.json",
                     seed_help="seed for the folds, weights, shuffling and augmentation")
    return parser


def main(args):
    device = distributed.pick_device(args.device)
    source = transfer.load_source(args.source)
    [k] = transfer.resolve_freeze([args.freeze], source["model"])
    out = cli.prepare_out_dir(args.out, overwrite=args.overwrite, markers=("crossval.csv", "crossval.json"))
    labelled = crossval.pool(*(load_split(args.data, split, args.task, source["image_size"],
                                          resize=source.get("resize", "squash"), **cli.load_options(args))
                               for split in ("train", "val")))
    # Every epoch runs: stopping early would let the held-out images choose.
    config = dataclasses.replace(config_from_args(args, device), patience=args.epochs)
    print(f"{source['model']} from {args.source}: {args.folds}-fold cross-validation over {len(labelled)} "
          f"labelled images of {args.task}, freeze {args.freeze}, {device}, amp {'on' if config.amp else 'off'}")
    rows = []
    for fold, (train, heldout) in enumerate(crossval.folds(labelled, args.folds, args.seed), start=1):
        model, frozen = transfer.build_target(source, args.source, len(labelled.classes), k, args.seed)
        describe = transfer.target_describe(source, args.task, labelled.classes, cli.plain_args(args),
                                            transfer.lineage(args.source, k, source["model"]))
        run_dir = cli.prepare_out_dir(out / f"fold-{fold}", overwrite=True)
        history = fit(model, train, heldout, describe=describe, config=config, out=run_dir, device=device,
                      seed=args.seed, param_groups=transfer.param_groups(model, args.lr_backbone),
                      frozen_modules=frozen)
        rows.append(crossval.fold_row(fold, train, heldout, history))
        print(f"fold {fold}/{args.folds}: held-out loss {rows[-1]['loss']:.4f}, accuracy "
              f"{rows[-1]['accuracy']:.4f}, AUROC {rows[-1]['auroc']:.4f}")
    summary = crossval.summarise(rows)
    print(crossval.format_table(rows, summary))
    write_csv(rows, out / "crossval.csv", crossval.COLUMNS)
    write_json({"args": cli.plain_args(args), **summary, "per_fold": rows}, out / "crossval.json")
    print(f"-> {out / 'crossval.csv'}, {out / 'crossval.json'}")


if __name__ == "__main__":
    cli.run(main, get_args_parser())
