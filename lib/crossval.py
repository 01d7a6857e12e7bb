"""Nested k-fold cross-validation of a transfer recipe over a task's labelled images (train and val pooled).

A small val split saturates (the landmarks' 140 target images give AUROC 0.999 to most recipes),
so it can neither rank recipes nor pick a checkpoint reliably. Here every labelled image is held
out once: the outer folds are stratified and depend only on --fold-seed, so recipes and seeds
are compared on the same folds. Each outer fold's training images are split again (stratified,
the same seed) into inner train and inner val, as a real run has train and val: the run
validates on inner val every epoch, and ALSO predicts the held-out fold every epoch, which
influences nothing. One record per fold (OUT/fold-N/heldout.pt: held-out probabilities per
epoch, labels, file names, the inner-val history and the recipe) lets any selection rule
(lib.selection: last, best by a metric, early stopping) be scored afterwards from one training
run per fold, since the weights of epoch e do not depend on whether training would have stopped
later; `ensemble` scores the mean probabilities of several runs (seeds) the same way.
With --inner-val 0 (plain k-fold) each fold trains on all its training images, validates on the
held-out part, and only the last epoch is scored (any other rule would choose on held-out images).
"""
import pickle
import statistics
import zipfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold, train_test_split

from lib import cli, flops, transfer
from lib.checkpoint import data_location, resume_mismatches, save_checkpoint
from lib.data import ImageRows, Split, detect_layout, match_classes
from lib.engine import fit
from lib.errors import UserError
from lib.inference import predict_probs
from lib.metrics import epoch_metrics
from lib.recipe import TrainConfig
from lib.selection import METRICS, replay

RECORD = "heldout.pt"
RECORD_FORMAT = "landmark-classification-crossval/1"
SCORES = ("loss", "accuracy", "auroc", "balanced_accuracy")
COLUMNS = ["rule", "fold", "epoch", *SCORES, "train_images", "val_images", "heldout_images", "tflop", "seconds"]
MAX_SEED = 2**32 - 1  # scikit-learn's random_state range


class Rule(NamedTuple):
    """A checkpoint-selection rule, as lib.selection.replay takes it."""
    name: str
    select: str
    metric: str
    patience: int | None
    stop_below_peak: bool = True


# transfer.py's patience before the recipe ran every epoch: the early-stopping rule is scored with
# it when the recipe has none.
PREVIOUS_PATIENCE = 8


def rules(config, nested):
    """The rules a run is scored by: the last epoch; without early stopping, the best by each
    metric; early stopping as it was before the learning-rate condition (best accuracy,
    patience only); and the recipe's own rule (its --select, --select-metric, --patience).
    Without an inner val split only the last epoch can be scored."""
    last = Rule("last", "last", config.select_metric, None)
    if not nested:
        return [last]
    patience = config.patience or PREVIOUS_PATIENCE
    return [last, *(Rule(f"best-{metric}", "best", metric, None) for metric in METRICS),
            Rule(f"early-stop-{patience}", "best", "accuracy", patience, stop_below_peak=False),
            Rule("recipe", config.select, config.select_metric, config.patience)]


def pool(*splits):
    """One Split of several labelled splits of the same task, labelled in the first's class order;
    its images index theirs (no copy)."""
    classes = splits[0].classes
    splits = [match_classes(part, classes, "the splits to pool") for part in splits]
    return Split(ImageRows([part.images for part in splits]), torch.cat([part.labels for part in splits]),
                 classes, [name for part in splits for name in part.filenames])


def folds(split, k, seed):
    """(train Split, held-out Split) for each of k stratified folds."""
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"--fold-seed {seed}: must be from 0 to {MAX_SEED}")
    counts = torch.bincount(split.labels, minlength=len(split.classes))
    if k < 2 or k > int(counts.min()):
        raise UserError(f"--folds {k}: must be from 2 to the smallest class's image count ({int(counts.min())})")
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(split.rows(train_index), split.rows(heldout_index))
            for train_index, heldout_index in splitter.split(split.labels.numpy(), split.labels.numpy())]


def inner_split(split, fraction, seed):
    """(inner train, inner val) of a fold's training images: stratified, `fraction` to val."""
    try:
        train_index, val_index = train_test_split(np.arange(len(split)), test_size=fraction, random_state=seed,
                                                  stratify=split.labels.numpy())
    except ValueError as error:
        raise UserError(f"--inner-val {fraction}: cannot split {len(split)} images by class ({error})") from None
    return split.rows(np.sort(train_index)), split.rows(np.sort(val_index))


def check_source(source, path, task, data):
    """Refuse a source trained on this very task and data: every held-out image would already
    have shaped the model, and the held-out scores would be flattered. The data is compared by
    what it is (each folder's real path, the task only where the CSV layout has tasks), not by
    how --data and --task were written; several datasets refuse when any of them is shared."""
    shared = _locations((source.get("args") or {}).get("data")) & _locations(data)
    if not shared:
        return
    # An ImageFolder dataset has one task, whatever --task said when the source was trained.
    if source.get("task") == task or any(detect_layout(Path(place)) == "imagefolder" for place in shared):
        raise UserError(f"--source {path}: was trained on {cli.data_name(data, task)} itself, so every held-out "
                        f"image already shaped it; cross-validate from a source trained on another task")


def _locations(data):
    """The set of dataset folders a --data value (one or a list) names."""
    locations = data_location(data)
    return set(locations) if isinstance(locations, list) else {locations}


def run_fold(fold, train, val, heldout, *, source, source_path, k, describe, recipe, out, device, seed, settings,
             unlabelled=None):
    """Train one fold (every epoch runs and is validated) and return its record; unlabelled: fit's.

    settings: the cross-validation's own settings (folds, fold seed, inner-val share), kept in
    the record so --resume can tell whether a finished fold still belongs to this command."""
    model, frozen = transfer.build_target(source, source_path, len(train.classes), k, seed)
    mean, std = describe["mean"], describe["std"]
    heldout_probs = {}

    def monitor(epoch, evaluated):
        heldout_probs[epoch] = predict_probs(evaluated, heldout.images, mean, std, device)

    history = fit(model, train, val, describe=describe, config=replace(recipe, patience=None, eval_every=1),
                  out=out, device=device, seed=seed,
                  param_groups=transfer.param_groups(model, describe["model"], recipe.lr_backbone),
                  frozen_modules=frozen, monitor=monitor, unlabelled=unlabelled)
    epochs = sorted(heldout_probs)
    heldout_tflop = len(epochs) * len(heldout) * flops.inference_flops(model, describe["image_size"]) / 1e12
    return {"format": RECORD_FORMAT, "fold": fold, **settings, "describe": describe, "config": asdict(recipe),
            "classes": list(train.classes), "heldout_filenames": list(heldout.filenames),
            "heldout_labels": heldout.labels.clone(), "train_filenames": list(train.filenames),
            "val_filenames": list(val.filenames), "epochs": epochs,
            "probs": torch.stack([heldout_probs[e] for e in epochs]), "history": history,
            "tflop": history[-1]["total_tflop"] + heldout_tflop, "seconds": sum(r["seconds"] for r in history)}


def save_record(record, path):
    save_checkpoint(record, path)


def load_record(path):
    """A fold's record; anything else is a UserError naming the file."""
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        raise UserError(f"{path}: not a readable cross-validation record ({str(error).splitlines()[0]})") from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise UserError(f"{path}: not a {RECORD_FORMAT} record")
    return record


def check_record(record, describe, path):
    """Refuse to keep a finished fold of another command (--resume), in one line naming the flags
    (its --folds, --fold-seed and --inner-val among them: they are in the description's args)."""
    flags = resume_mismatches(record["describe"], describe)
    if flags:
        raise UserError(f"--resume: {path} belongs to a cross-validation with different {', '.join(flags)}; "
                        "resume with the same settings, or use --overwrite")


def choose(record, rule):
    """The epoch `rule` picks from the record's inner-val history."""
    epoch, _ = replay(record["history"], TrainConfig(**record["config"]), rule.select, rule.metric, rule.patience,
                      rule.stop_below_peak)
    return epoch


def heldout_scores(labels, probs):
    stats = epoch_metrics(labels, probs)
    return {name: stats[name] for name in SCORES}


def score(records, rule_list):
    """One row per (rule, fold): the epoch the rule picks and the held-out metrics there."""
    rows = []
    for rule in rule_list:
        for record in records:
            epoch = choose(record, rule)
            probs = record["probs"][record["epochs"].index(epoch)]
            rows.append({"rule": rule.name, "fold": record["fold"], "epoch": epoch,
                         **heldout_scores(record["heldout_labels"], probs),
                         "train_images": len(record["train_filenames"]), "val_images": len(record["val_filenames"]),
                         "heldout_images": len(record["heldout_filenames"]), "tflop": record["tflop"],
                         "seconds": record["seconds"]})
    return rows


def summarise(rows):
    """Per rule: mean and standard deviation over folds of each held-out metric, and the epochs chosen."""
    summary = {}
    for name in dict.fromkeys(r["rule"] for r in rows):
        mine = [r for r in rows if r["rule"] == name]
        summary[name] = {metric: {"mean": statistics.mean(r[metric] for r in mine),
                                  "sd": statistics.stdev(r[metric] for r in mine) if len(mine) > 1 else 0.0}
                         for metric in SCORES}
        summary[name]["epochs"] = [r["epoch"] for r in mine]
        summary[name]["tflop"] = sum(r["tflop"] for r in mine)
    return summary


def format_table(summary):
    lines = [f"{'rule':<24} {'held-out loss':>16} {'accuracy':>16} {'AUROC':>16}  epochs chosen (per fold)"]
    for name, s in summary.items():
        cells = " ".join(f"{s[m]['mean']:.4f} ({s[m]['sd']:.4f})".rjust(16) for m in ("loss", "accuracy", "auroc"))
        lines.append(f"{name:<24} {cells}  {' '.join(map(str, s['epochs']))}")
    return "\n".join(lines)


def fold_records(run_dir):
    """The fold records of one crossval.py output folder, in fold order."""
    paths = sorted(Path(run_dir).glob(f"fold-*/{RECORD}"), key=lambda p: int(p.parent.name.removeprefix("fold-")))
    if not paths:
        raise UserError(f"{run_dir}: no fold-N/{RECORD} records (a crossval.py output folder?)")
    return [load_record(path) for path in paths]


def rule_named(record, name):
    """The rule called `name` among those a fold's record can be scored by."""
    available = rules(TrainConfig(**record["config"]), record["inner_val"] > 0)
    for rule in available:
        if rule.name == name:
            return rule
    raise UserError(f"rule {name!r}: choose from {', '.join(r.name for r in available)}")


def ensemble(run_dirs, rule_name="last"):
    """Held-out metrics of an ensemble: per fold, the mean of the runs' held-out probabilities,
    each run at the epoch `rule_name` picks from its own inner-val history. The runs (e.g. one
    per --seed) must share the folds (the same --fold-seed, --folds, --inner-val and data).
    Returns (rows, summary) as score and summarise give them; a row's epoch lists the members'."""
    runs = [fold_records(run_dir) for run_dir in run_dirs]
    rows = []
    for run_dir, records in zip(run_dirs, runs):
        if len(records) != len(runs[0]):
            raise UserError(f"{run_dir}: {len(records)} folds, {run_dirs[0]} has {len(runs[0])}")
    for fold_of_runs in zip(*runs):
        first = fold_of_runs[0]
        for run_dir, record in zip(run_dirs, fold_of_runs):
            if (record["heldout_filenames"] != first["heldout_filenames"]
                    or not torch.equal(record["heldout_labels"], first["heldout_labels"])):
                raise UserError(f"{run_dir}: fold {record['fold']} holds out other images than {run_dirs[0]}'s "
                                "(use the same --fold-seed, --folds and data)")
        epochs = [choose(record, rule_named(record, rule_name)) for record in fold_of_runs]
        probs = torch.stack([record["probs"][record["epochs"].index(epoch)]
                             for record, epoch in zip(fold_of_runs, epochs)]).mean(0)
        rows.append({"rule": f"ensemble of {len(runs)}, {rule_name}", "fold": first["fold"], "epoch": epochs,
                     **heldout_scores(first["heldout_labels"], probs),
                     "tflop": sum(record["tflop"] for record in fold_of_runs)})
    return rows, summarise(rows)
