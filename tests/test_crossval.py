"""Cross-validation (crossval.py, lib.crossval): stratified, disjoint, repeatable folds; nested
folds that score every selection rule on images that chose nothing, --resume, --inner-val 0;
ensembles of runs; the refusal of a source trained on the data being cross-validated, by what the
data is, not by how --data and --task were written."""
import csv
import dataclasses
import json
import shutil

import pytest
import torch

from conftest import run_main
from lib import crossval
from lib.checkpoint import load_checkpoint, save_checkpoint
from lib.data import load_split
from lib.errors import UserError
from lib.metrics import epoch_metrics
from lib.recipe import TrainConfig
from test_reliability import assert_clean_error


def imagefolder_copy(demo_data, root):
    """A small ImageFolder dataset (train/ and val/, two classes) made of demo images."""
    images = sorted((demo_data / "images").glob("*.png"))
    for split, offset in (("train", 0), ("val", 40)):
        for c, name in enumerate(("arch", "spire")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for path in images[offset + 10 * c: offset + 10 * c + 6]:
                shutil.copy(path, folder)
    return root


def trained_on(checkpoint_path, data, task, dest):
    """The checkpoint as if trained with --data DATA --task TASK (all crossval reads of its past)."""
    checkpoint = load_checkpoint(checkpoint_path)
    checkpoint["args"] = {**checkpoint["args"], "data": str(data), "task": task}
    checkpoint["task"] = task
    save_checkpoint(checkpoint, dest)
    return dest


def run_crossval(source, data, out, *task):
    return run_main("crossval.py", "--source", source, "--data", data, *task, "--folds", "2", "--epochs", "1",
                    "--out", out, check=False)


@pytest.mark.parametrize("written", ["demo", "folder"])
def test_demo_and_its_folder_are_the_same_data(target_run, demo_data, tmp_path, written):
    """target_run was trained with --data <the demo folder>; `--data demo` is the same images, and so
    is a source trained with --data demo cross-validated on the folder."""
    source, data = target_run / "best.pt", "demo"
    if written == "folder":
        source, data = trained_on(source, "demo", "target", tmp_path / "from_demo.pt"), demo_data
    result = run_crossval(source, data, tmp_path / "cv", "--task", "target")
    assert_clean_error(result, "--source", "already shaped it")
    assert not (tmp_path / "cv").exists()


def test_an_imagefolder_source_is_the_same_data_whatever_its_task(target_run, demo_data, tmp_path):
    folder = imagefolder_copy(demo_data, tmp_path / "photos")
    source = trained_on(target_run / "best.pt", folder, "target", tmp_path / "photos.pt")
    result = run_crossval(source, tmp_path / "." / "photos", tmp_path / "cv")  # no --task, the path written otherwise
    assert_clean_error(result, "--source", "already shaped it")
    assert not (tmp_path / "cv").exists()


def test_folds_are_stratified_disjoint_and_repeatable(demo_data):
    labelled = crossval.pool(load_split(demo_data, "train", "target"), load_split(demo_data, "val", "target"))
    first = [sorted(heldout.filenames) for _, heldout in crossval.folds(labelled, 4, seed=1)]
    again = [sorted(heldout.filenames) for _, heldout in crossval.folds(labelled, 4, seed=1)]
    assert first == again and sorted(sum(first, [])) == sorted(labelled.filenames)
    for train, heldout in crossval.folds(labelled, 4, seed=1):
        assert not set(train.filenames) & set(heldout.filenames)
        share = heldout.labels.float().mean().item()
        assert abs(share - labelled.labels.float().mean().item()) < 0.05


def test_nested_crossval_scores_each_rule_on_images_that_chose_nothing(source_run, demo_data, tmp_path, monkeypatch):
    trained = []  # (train, val) file names of every fold that fit trained
    real_fit = crossval.fit

    def spy(model, train, val, **kwargs):
        trained.append((set(train.filenames), set(val.filenames)))
        return real_fit(model, train, val, **kwargs)

    monkeypatch.setattr(crossval, "fit", spy)
    out = tmp_path / "cv"
    args = ["--source", source_run / "best.pt", "--data", demo_data, "--task", "target", "--folds", "2",
            "--epochs", "3", "--lr", "3e-3", "--ema", "0", "--out", out]
    run_main("crossval.py", *args)
    records = crossval.fold_records(out)
    assert len(trained) == 2 and [r["fold"] for r in records] == [1, 2]
    for (train, val), record in zip(trained, records):
        heldout = set(record["heldout_filenames"])
        assert not heldout & train and not heldout & val, "held-out images trained or validated"
        assert not train & val and len(train | val | heldout) == 140 and len(heldout) == 70
        assert (set(record["train_filenames"]), set(record["val_filenames"])) == (train, val)
        assert record["epochs"] == [1, 2, 3] and record["probs"].shape == (3, 70, 2)
    rows = list(csv.DictReader(open(out / "crossval.csv")))
    assert [r["rule"] for r in rows[::2]] == ["last", "best-accuracy", "best-auroc", "best-loss",
                                               "best-balanced_accuracy", "early-stop-8", "recipe"]
    for row in rows:
        record = records[int(row["fold"]) - 1]
        history = record["history"]
        # Each rule's pick, recomputed from the saved inner-val history (first of equals wins).
        picks = {"last": history[-1],
                 "best-loss": min(history, key=lambda r: (r["val_loss"], -r["val_accuracy"], -r["val_auroc"])),
                 "best-auroc": max(history, key=lambda r: (r["val_auroc"], r["val_accuracy"], -r["val_loss"])),
                 "best-accuracy": max(history, key=lambda r: (r["val_accuracy"], r["val_auroc"], -r["val_loss"]))}
        if row["rule"] in picks:
            assert int(row["epoch"]) == picks[row["rule"]]["epoch"], row
        expected = epoch_metrics(record["heldout_labels"], record["probs"][int(row["epoch"]) - 1])
        for metric in ("loss", "accuracy", "auroc"):
            assert float(row[metric]) == pytest.approx(expected[metric], rel=1e-9), (row, metric)
    summary = json.loads((out / "crossval.json").read_text())["summary"]
    assert summary["best-loss"]["auroc"]["mean"] == pytest.approx(
        sum(float(r["auroc"]) for r in rows if r["rule"] == "best-loss") / 2)
    # --resume keeps the finished folds of the same command and trains the others.
    (out / "fold-2" / crossval.RECORD).unlink()
    trained.clear()
    resumed = run_main("crossval.py", *args, "--resume")
    assert "fold 1/2: finished earlier, kept" in resumed.stdout and len(trained) == 1
    refused = run_main("crossval.py", *args, "--lr", "1e-2", "--resume", check=False)
    assert refused.returncode == 2 and "different --lr" in refused.stderr.strip().splitlines()[0]
    # --inner-val 0: plain k-fold, validated on the held-out part, scored at the last epoch only.
    trained.clear()
    run_main("crossval.py", *args[:-1], tmp_path / "plain", "--inner-val", "0", "--epochs", "1")
    plain = crossval.fold_records(tmp_path / "plain")
    assert [val for _, val in trained] == [set(record["heldout_filenames"]) for record in plain]
    assert [r["rule"] for r in csv.DictReader(open(tmp_path / "plain" / "crossval.csv"))] == ["last", "last"]


def test_crossval_refuses_a_source_trained_on_the_task_and_a_bad_fold_seed(target_run, source_run, demo_data,
                                                                             tmp_path):
    same_task = run_main("crossval.py", "--source", target_run / "best.pt", "--data", demo_data, "--task", "target",
                         "--out", tmp_path / "cv", check=False)
    assert same_task.returncode == 2 and len(same_task.stderr.strip().splitlines()) == 1
    assert "--source" in same_task.stderr and "already shaped it" in same_task.stderr
    assert not (tmp_path / "cv").exists()
    for seed in ("-1", str(2**32)):
        bad_seed = run_main("crossval.py", "--source", source_run / "best.pt", "--data", demo_data, "--task", "target",
                            "--fold-seed", seed, "--out", tmp_path / "cv2", check=False)
        assert bad_seed.returncode == 2 and "--fold-seed" in bad_seed.stderr, bad_seed.stderr
        assert len(bad_seed.stderr.strip().splitlines()) == 1 and "Traceback" not in bad_seed.stderr


def _record(run_dir, probs, losses, filenames):
    """A fold record as crossval.py writes it, with given held-out probabilities per epoch."""
    history = [{"epoch": e, "val_loss": loss, "val_accuracy": 0.5, "val_auroc": 0.5, "val_balanced_accuracy": 0.5}
               for e, loss in enumerate(losses, start=1)]
    record = {"format": crossval.RECORD_FORMAT, "fold": 1, "folds": 2, "fold_seed": 0, "inner_val": 0.25,
              "config": dataclasses.asdict(TrainConfig(epochs=len(losses))), "heldout_filenames": filenames,
              "heldout_labels": torch.tensor([0, 1, 0, 1]), "epochs": list(range(1, len(losses) + 1)),
              "probs": probs, "history": history, "tflop": 1.0}
    (run_dir / "fold-1").mkdir(parents=True)
    crossval.save_record(record, run_dir / "fold-1" / crossval.RECORD)


def test_ensemble_averages_each_runs_heldout_probabilities_at_its_own_pick(tmp_path):
    generator = torch.Generator().manual_seed(0)
    probs = {run: torch.softmax(torch.randn(2, 4, 2, generator=generator), dim=-1) for run in "ab"}
    names = ["w.png", "x.png", "y.png", "z.png"]
    _record(tmp_path / "a", probs["a"], [0.3, 0.4], names)  # best loss at epoch 1
    _record(tmp_path / "b", probs["b"], [0.4, 0.3], names)  # and at epoch 2
    labels = torch.tensor([0, 1, 0, 1])
    rows, summary = crossval.ensemble([tmp_path / "a", tmp_path / "b"], "best-loss")
    assert rows[0]["epoch"] == [1, 2]
    expected = epoch_metrics(labels, (probs["a"][0] + probs["b"][1]) / 2)
    assert rows[0]["loss"] == pytest.approx(expected["loss"]) and rows[0]["auroc"] == expected["auroc"]
    rows, _ = crossval.ensemble([tmp_path / "a", tmp_path / "b"], "last")
    assert rows[0]["loss"] == pytest.approx(epoch_metrics(labels, (probs["a"][1] + probs["b"][1]) / 2)["loss"])
    assert summary["ensemble of 2, best-loss"]["loss"]["mean"] == pytest.approx(expected["loss"])
    _record(tmp_path / "c", probs["b"], [0.4, 0.3], ["other.png", *names[1:]])
    with pytest.raises(UserError, match="holds out other images"):
        crossval.ensemble([tmp_path / "a", tmp_path / "c"])


def test_crossval_folds_are_index_views_of_the_mapped_pixels(demo_data):
    train, val = (load_split(demo_data, split, "target") for split in ("train", "val"))
    pooled = crossval.pool(train, val)
    assert pooled.images.parts[0] is train.images and pooled.images.parts[1] is val.images, "no copy"
    together = torch.cat([train.images, val.images])
    index = torch.tensor([0, 5, len(train) - 1, len(train), len(together) - 1, 3])
    assert torch.equal(pooled.images[index], together[index])
    fold_train, heldout = crossval.folds(pooled, 5, seed=0)[0]
    assert torch.equal(heldout.images[1:3], together[heldout.images.index[1:3]])
    assert torch.equal(heldout.images[::2], together[heldout.images.index[::2]])
    assert torch.equal(heldout.images[1], together[heldout.images.index[1]])
    assert heldout.images.shape == (len(heldout), 3, 64, 64)
