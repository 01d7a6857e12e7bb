"""Cross-validate a transfer recipe and its checkpoint selection: nested stratified k-fold over the labelled images.

Example: python crossval.py --source runs/source/model.pt --data ../shared/data/landmarks --task target --out runs/cv
Takes transfer.py's options. The train and val images are pooled and split into --folds
stratified folds (by --fold-seed, so recipes and seeds see the same folds); each fold's
training images are split again into inner train and inner val (--inner-val of them). Each
fold trains every epoch into OUT/fold-N/, validates on inner val and predicts its held-out
part at every epoch (OUT/fold-N/heldout.pt), which chooses nothing; then every selection rule
(last epoch, best by each metric, early stopping, the recipe's own) is scored on the held-out
images at the epoch it picks. Writes OUT/crossval.csv (one row per rule and fold) and
OUT/crossval.json (per rule: means and standard deviations over folds). --inner-val 0 is plain
k-fold: train on all of a fold's training images and score the last epoch only.
"""
from lib import cli, crossval, transfer, unlabelled
from lib.checkpoint import read_preprocessing
from lib.data import load_datasets
from lib.distributed import pick_device
from lib.errors import UserError
from lib.files import write_csv, write_json
from lib.recipe import config_from_args


def get_args_parser():
    parser = cli.make_parser(__doc__)
    transfer.add_transfer_args(parser, sweep=False)
    group = parser.add_argument_group("cross-validation")
    group.add_argument("--folds", type=cli.positive_int, default=5, help="number of outer folds")
    group.add_argument("--fold-seed", type=cli.non_negative_int, default=0,
                       help="seed of the outer folds and inner splits (--seed seeds the training)")
    group.add_argument("--inner-val", type=cli.unit_interval, default=0.25,
                       help="share of each fold's training images that validate (inner val); 0: plain k-fold")
    cli.add_run_args(parser, "output folder for the folds' runs, crossval.csv and crossval.json; with --resume, "
                             "finished folds are kept", seed_help="seed for weights, shuffling and augmentation")
    return parser


def main(args):
    device = pick_device(args.device)
    source = transfer.load_source(args.source)
    crossval.check_source(source, args.source, args.task, args.data)
    [k] = transfer.resolve_freeze([args.freeze], source["model"])
    if args.teacher:
        raise UserError(f"--teacher {args.teacher}: cross-validation takes no teacher (one trained on these "
                        f"labelled images has seen every held-out fold); distil with transfer.py or train.py")
    out = cli.prepare_out_dir(args.out, ("crossval.csv", "crossval.json", "fold-*"),
                              overwrite=args.overwrite or args.resume)
    facts = read_preprocessing(source, where=f"--source {args.source}")
    labelled = crossval.pool(*(load_datasets(args.data, split, args.task, facts.image_size, resize=facts.resize,
                                             **cli.load_options(args))
                               for split in ("train", "val")))
    recipe = config_from_args(args, device)
    settings = {"folds": args.folds, "fold_seed": args.fold_seed, "inner_val": args.inner_val}
    nested = args.inner_val > 0
    print(f"{source['model']} from {args.source}: {args.folds}-fold {'nested ' if nested else ''}cross-validation "
          f"over {len(labelled)} labelled images of {cli.data_name(args.data, args.task)}, freeze {args.freeze}, "
          f"{device}, amp {'on' if recipe.amp else 'off'}; every epoch runs and is validated on "
          f"{'inner val' if nested else 'the held-out fold'}; the held-out fold chooses nothing")
    describe = transfer.target_describe(source, args.task, labelled.classes, cli.plain_args(args),
                                        transfer.lineage(args.source, k, source["model"], args.data))
    fixmatch = unlabelled.setup(args.unlabelled, args.data, args.task, facts.image_size, facts.resize, recipe,
                                **cli.load_options(args))
    if fixmatch:
        describe["unlabelled"] = fixmatch.entry
        print(fixmatch.summary())
    records = []
    for fold, (train, heldout) in enumerate(crossval.folds(labelled, args.folds, args.fold_seed), start=1):
        path = out / f"fold-{fold}" / crossval.RECORD
        if args.resume and path.is_file():
            records.append(crossval.load_record(path))
            crossval.check_record(records[-1], describe, path)
            print(f"fold {fold}/{args.folds}: finished earlier, kept ({path})")
            continue
        inner_train, val = crossval.inner_split(train, args.inner_val, args.fold_seed) if nested else (train, heldout)
        run_dir = cli.prepare_out_dir(out / f"fold-{fold}", cli.RUN_OUTPUTS, overwrite=True)
        records.append(crossval.run_fold(fold, inner_train, val, heldout, source=source, source_path=args.source,
                                         k=k, describe=describe, recipe=recipe, out=run_dir, device=device,
                                         seed=args.seed, settings=settings, unlabelled=fixmatch))
        crossval.save_record(records[-1], path)
        print(f"fold {fold}/{args.folds}: {len(inner_train)} train / {len(val)} val / {len(heldout)} held-out "
              f"images -> {path}")
    rows = crossval.score(records, crossval.rules(recipe, nested))
    summary = crossval.summarise(rows)
    print(crossval.format_table(summary))
    write_csv(rows, out / "crossval.csv", crossval.COLUMNS)
    write_json({"args": cli.plain_args(args), "folds": args.folds, "heldout_images": len(labelled),
                "tflop": sum(record["tflop"] for record in records),
                "rules": {rule.name: rule._asdict() for rule in crossval.rules(recipe, nested)},
                "summary": summary, "per_fold": rows}, out / "crossval.json")
    print(f"-> {out / 'crossval.csv'}, {out / 'crossval.json'}")


if __name__ == "__main__":
    cli.run(main, get_args_parser())
