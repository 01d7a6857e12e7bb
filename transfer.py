"""Fine-tune a source checkpoint on another task, with its first stages frozen.

Example: python transfer.py --source runs/source/best.pt --data ../shared/data/landmarks --task target --out runs/target
Writes OUT/model.pt (the checkpoint --select recommends), OUT/best.pt, OUT/last.pt,
OUT/metrics.csv and OUT/curves.png. Images are read at the
source checkpoint's size and normalised with its mean/std. With several --freeze values (a
sweep) each run goes to OUT/freeze-K/ and OUT/sweep.csv and OUT/sweep.png compare them; with
--resume a sweep continues the runs that have a last.pt and starts the others.
"""
from pathlib import Path

from lib import cli, distributed, transfer
from lib.data import load_split
from lib.engine import cost_summary, fit, recall_summary
from lib.models import stage_count
from lib.plots import plot_curves, plot_sweep
from lib.recipe import config_from_args
from lib.selection import chosen_row


def get_args_parser():
    parser = cli.make_parser(__doc__)
    transfer.add_transfer_args(parser, sweep=True)
    cli.add_run_args(parser, "output folder for checkpoints, metrics.csv and curves.png (or the sweep)")
    return parser


def _run_dirs(out, labels, overwrite, resume):
    """Check every run's folder before training any, so a refusal costs nothing."""
    if len(labels) == 1:
        return [(cli.prepare_out_dir(out, overwrite=overwrite, resume=resume), resume)]
    if not resume:
        cli.prepare_out_dir(out, overwrite=overwrite, markers=("sweep.csv", "sweep.png"))
    dirs = []
    for label in labels:
        run_dir = out / f"freeze-{label}"
        resume_run = resume and (run_dir / "last.pt").is_file()
        dirs.append((cli.prepare_out_dir(run_dir, overwrite=overwrite, resume=resume_run), resume_run))
    return dirs


def main(args):
    device = distributed.pick_device(args.device)
    distributed.setup(device)
    source = transfer.load_source(args.source)
    model_name = source["model"]
    freezes = transfer.resolve_freeze(args.freeze, model_name)
    labels = [transfer.freeze_label(k, model_name) for k in freezes]
    out = Path(args.out)
    run_dirs = _run_dirs(out, labels, args.overwrite, args.resume)
    resize = source.get("resize", "squash")
    train = load_split(args.data, "train", args.task, source["image_size"], resize=resize, **cli.load_options(args))
    val = load_split(args.data, "val", args.task, source["image_size"], resize=resize, **cli.load_options(args))
    config = config_from_args(args, device)
    if distributed.is_main():
        print(f"{model_name} from {args.source} to {cli.data_name(args.data, args.task)}: {len(train)} train / "
              f"{len(val)} val images, {len(train.classes)} classes, {device}, amp {'on' if config.amp else 'off'}")
    rows, histories = [], {}
    for k, label, (run_dir, resume) in zip(freezes, labels, run_dirs):
        model, frozen = transfer.build_target(source, args.source, len(train.classes), k, args.seed)
        describe = transfer.target_describe(source, args.task, train.classes, cli.plain_args(args),
                                            transfer.lineage(args.source, k, model_name))
        if distributed.is_main():
            print(f"freeze {label} of {stage_count(model_name)} stages: "
                  f"{transfer.trainable_params(model):,} trainable parameters -> {run_dir}")
        fit(model, train, val, describe=describe, config=config, out=run_dir, device=device,
            seed=args.seed, param_groups=transfer.param_groups(model, model_name, args.lr_backbone),
            frozen_modules=frozen, resume=resume)
        if distributed.is_main():
            row, histories[label] = transfer.run_summary(label, model, run_dir)
            rows.append(row)
            plot_curves(histories[label], run_dir / "curves.png")
            chosen = chosen_row(histories[label], config)
            print(recall_summary(run_dir / "model.pt"))
            print(f"{run_dir / 'model.pt'}: epoch {chosen['epoch']} (--select {config.select}), val accuracy "
                  f"{chosen['val_accuracy']:.4f}, balanced accuracy {chosen['val_balanced_accuracy']:.4f}, "
                  f"AUROC {chosen['val_auroc']:.4f}; best.pt: epoch {row['best_epoch']}; "
                  f"{cost_summary(histories[label])}")
    if len(rows) > 1:
        print(transfer.format_sweep(rows))
        transfer.write_sweep_csv(rows, out / "sweep.csv")
        plot_sweep(rows, histories, out / "sweep.png")
        print(f"sweep table -> {out / 'sweep.csv'}, plot -> {out / 'sweep.png'}")
    distributed.cleanup()


if __name__ == "__main__":
    cli.run(main, get_args_parser())
