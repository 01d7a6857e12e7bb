"""Fine-tune a source checkpoint on another task, with its first stages frozen.

Example: python transfer.py --source runs/source/best.pt --data ../shared/data/landmarks --task target --out runs/target
Writes OUT/model.pt (the checkpoint --select recommends), OUT/best.pt, OUT/last.pt,
OUT/metrics.csv and OUT/curves.png. Images are read at the
source checkpoint's size and normalised with its mean/std. With several --freeze values (a
sweep) each run goes to OUT/freeze-K/ and OUT/sweep.csv and OUT/sweep.png compare them. With
--seeds S1 S2 ... each seed's run goes to OUT/seed-S/ and OUT/model.pt is an ensemble checkpoint
of their model.pt files (lib.ensemble), which evaluate.py, explain.py and export.py take as one
model. With --resume a sweep or an ensemble continues the runs that have a last.pt and starts
the others.
"""
from pathlib import Path

from lib import cli, distill, distributed, ensemble, transfer, unlabelled
from lib.checkpoint import read_preprocessing
from lib.data import load_datasets
from lib.engine import fit, run_report
from lib.inference import predict_probs
from lib.metrics import epoch_metrics
from lib.models import stage_count
from lib.plots import plot_curves, plot_sweep
from lib.recipe import config_from_args


def get_args_parser():
    parser = cli.make_parser(__doc__)
    transfer.add_transfer_args(parser, sweep=True)
    cli.add_run_args(parser, "output folder for checkpoints, metrics.csv and curves.png (or the sweep)")
    return parser


def _plan(args, freezes, labels):
    """(frozen stages, seed, folder) of every run, and what the whole writes in OUT itself: an
    ensemble's members go to OUT/seed-S/, a sweep's runs to OUT/freeze-K/, one run to OUT."""
    if args.seeds:
        return [(freezes[0], seed, f"seed-{seed}") for seed in args.seeds], ("model.pt",)
    if len(freezes) > 1:
        return [(k, args.seed, f"freeze-{label}") for k, label in zip(freezes, labels)], ("sweep.csv", "sweep.png")
    return [(freezes[0], args.seed, None)], None


def _run_dirs(out, folders, outputs, overwrite, resume):
    """Check every run's folder before training any, so a refusal costs nothing."""
    if folders == [None]:
        return [(cli.prepare_out_dir(out, cli.RUN_OUTPUTS, overwrite=overwrite, resume=resume), resume)]
    if not resume:
        cli.prepare_out_dir(out, outputs, overwrite=overwrite)
    dirs = []
    for folder in folders:
        run_dir = out / folder
        resume_run = resume and (run_dir / "last.pt").is_file()
        dirs.append((cli.prepare_out_dir(run_dir, cli.RUN_OUTPUTS, overwrite=overwrite, resume=resume_run), resume_run))
    return dirs


def _write_ensemble(run_dirs, out, val, histories, device):
    """OUT/model.pt from the members' model.pt; prints what it is, costs and scores on val."""
    checkpoint, network = ensemble.write_ensemble([run_dir / "model.pt" for run_dir, _ in run_dirs], out / "model.pt")
    scores = epoch_metrics(val.labels, predict_probs(network, val.images, checkpoint["mean"], checkpoint["std"], device))
    tflop, seconds = sum(h[-1]["total_tflop"] for h in histories), sum(r["seconds"] for h in histories for r in h)
    print(f"{ensemble.summary(out / 'model.pt', checkpoint, network)}; val accuracy {scores['accuracy']:.4f}, "
          f"AUROC {scores['auroc']:.4f}, loss {scores['loss']:.4f}; trained in {tflop:.2f} TFLOP, {seconds:.0f} s")


def main(args):
    device = distributed.pick_device(args.device)
    distributed.setup(device)
    source = transfer.load_source(args.source)
    model_name = source["model"]
    freezes = transfer.resolve_freeze(args.freeze, model_name)
    labels = [transfer.freeze_label(k, model_name) for k in freezes]
    transfer.check_seeds(args.seeds, freezes)
    runs, outputs = _plan(args, freezes, labels)
    out = Path(args.out)
    run_dirs = _run_dirs(out, [folder for _, _, folder in runs], outputs, args.overwrite, args.resume)
    facts = read_preprocessing(source, where=f"--source {args.source}")
    train, val = (load_datasets(args.data, split, args.task, facts.image_size, resize=facts.resize,
                                **cli.load_options(args)) for split in ("train", "val"))
    config = config_from_args(args, device)
    fixmatch = unlabelled.setup(args.unlabelled, args.data, args.task, facts.image_size, facts.resize, config,
                                **cli.load_options(args))
    teacher = distill.load_teacher(args.teacher, config.teacher_weight, train.classes, facts.resize, device)
    if distributed.is_main():
        print(f"{model_name} from {args.source} to {cli.data_name(args.data, args.task)}: {len(train)} train / "
              f"{len(val)} val images, {len(train.classes)} classes, {device}, amp {'on' if config.amp else 'off'}")
        if fixmatch:
            print(fixmatch.summary())
        if teacher:
            print(teacher.summary())
    rows, histories = [], []
    for (k, seed, _), (run_dir, resume) in zip(runs, run_dirs):
        label = transfer.freeze_label(k, model_name)
        model, frozen = transfer.build_target(source, args.source, len(train.classes), k, seed)
        describe = transfer.target_describe(source, args.task, train.classes, {**cli.plain_args(args), "seed": seed},
                                            transfer.lineage(args.source, k, model_name, args.data))
        if fixmatch:
            describe["unlabelled"] = fixmatch.entry
        if teacher:
            describe["teacher"] = teacher.entry
        if distributed.is_main():
            print(f"freeze {label} of {stage_count(model_name)} stages{f', seed {seed}' if args.seeds else ''}: "
                  f"{transfer.trainable_params(model):,} trainable parameters -> {run_dir}")
        fit(model, train, val, describe=describe, config=config, out=run_dir, device=device,
            seed=seed, param_groups=transfer.param_groups(model, model_name, args.lr_backbone),
            frozen_modules=frozen, resume=resume, unlabelled=fixmatch, teacher=teacher)
        if distributed.is_main():
            row, history = transfer.run_summary(label, model, run_dir)
            rows.append(row)
            histories.append(history)
            plot_curves(history, run_dir / "curves.png")
            print(run_report(run_dir, history, config, best_epoch=row["best_epoch"]))
    if args.seeds and distributed.is_main():
        _write_ensemble(run_dirs, out, val, histories, device)
    elif len(rows) > 1:
        print(transfer.format_sweep(rows))
        transfer.write_sweep_csv(rows, out / "sweep.csv")
        plot_sweep(rows, dict(zip(labels, histories)), out / "sweep.png")
        print(f"sweep table -> {out / 'sweep.csv'}, plot -> {out / 'sweep.png'}")
    distributed.cleanup()


if __name__ == "__main__":
    cli.run(main, get_args_parser())
