"""Classes matched by name: a dataset whose classes are the model's in another order (an ImageFolder's
sorted folders against the CSV's numeric_label order) is evaluated, explained, pooled and ensembled
in the model's order; only a different set of names is refused, naming what is missing or extra."""
import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_main
from lib.checkpoint import build_from_checkpoint, load_checkpoint, save_checkpoint
from lib.crossval import pool
from lib.data import Split, match_classes
from lib.ensemble import ensemble_checkpoint
from lib.errors import UserError


def _imagefolder_copy(demo_data, folder, task, split, rename=None):
    """The CSV rows of (task, split) as folder/split/<semantic_label>/<file>; rename: {old: new} class names."""
    with open(demo_data / "landmarks.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["task"] == task and r["partition"] == split]
    for row in rows:
        name = (rename or {}).get(row["semantic_label"], row["semantic_label"])
        (folder / split / name).mkdir(parents=True, exist_ok=True)
        shutil.copy(demo_data / "images" / row["filename"], folder / split / name / row["filename"])
    return {row["filename"]: row["semantic_label"] for row in rows}


def _predictions(path):
    with open(path, newline="") as f:
        return {Path(row.pop("filename")).name: row for row in csv.DictReader(f)}


def test_an_imagefolder_copy_in_another_class_order_evaluates_as_the_csv_original(target_run, demo_data, tmp_path):
    folder = tmp_path / "folders"
    truth = _imagefolder_copy(demo_data, folder, "target", "val")
    checkpoint = load_checkpoint(target_run / "best.pt")
    assert sorted(checkpoint["classes"]) != checkpoint["classes"], "the folders must sort in another order"
    for name, data in (("csv", demo_data), ("folders", folder)):
        run_main("evaluate.py", "--checkpoint", target_run / "best.pt", "--data", data, "--task", "target",
                 "--split", "val", "--out", tmp_path / name)
    original, copy = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("csv", "folders"))
    assert (copy["n_images"], copy["confusion_matrix"]) == (original["n_images"], original["confusion_matrix"])
    for key in ("accuracy", "balanced_accuracy", "auroc", "loss"):
        assert copy[key] == pytest.approx(original[key], abs=1e-6), key
    for name, row in original["per_class"].items():
        assert copy["per_class"][name] == pytest.approx(row), name
    assert list(copy["per_class"]) == checkpoint["classes"], "reported in the model's class order"
    by_csv, by_folders = _predictions(tmp_path / "csv" / "predictions.csv"), _predictions(
        tmp_path / "folders" / "predictions.csv")
    assert by_folders.keys() == by_csv.keys() and all(by_csv[f]["true_label"] == label for f, label in truth.items())
    for name, row in by_csv.items():
        assert by_folders[name]["true_label"] == row["true_label"], name
        assert [float(by_folders[name][c]) for c in row if c.startswith("prob_")] == pytest.approx(
            [float(row[c]) for c in row if c.startswith("prob_")], abs=2e-6), name


def test_explain_reads_an_imagefolder_copy_in_another_class_order(target_run, demo_data, tmp_path):
    truth = _imagefolder_copy(demo_data, tmp_path / "folders", "target", "val")
    run_main("explain.py", "--checkpoint", target_run / "best.pt", "--data", tmp_path / "folders",
             "--num-images", "6", "--out", tmp_path / "cam")
    images = json.loads((tmp_path / "cam" / "cam_stats.json").read_text())["images"]
    assert len(images) == 6 and all(truth[Path(i["filename"]).name] == i["true"] for i in images)


def test_another_set_of_class_names_is_refused_naming_what_differs(target_run, demo_data, tmp_path):
    _imagefolder_copy(demo_data, tmp_path / "folders", "target", "val", rename={"palace": "palais"})
    result = run_main("evaluate.py", "--checkpoint", target_run / "best.pt", "--data", tmp_path / "folders",
                      "--split", "val", "--out", tmp_path / "eval", check=False)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "the classes differ (in the model, not in the data: palace; in the data, not in the model: palais)" \
           in result.stderr, result.stderr


def test_labels_are_renumbered_to_the_model_order():
    split = Split(torch.zeros(3, 3, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 2]), ["b", "c", "a"], ["x", "y", "z"])
    matched = match_classes(split, ["a", "b", "c"], "--data d")
    assert matched.classes == ["a", "b", "c"] and matched.labels.tolist() == [1, 2, 0]
    pooled = pool(Split(split.images, torch.tensor([0]), ["a", "b", "c"], ["w"]), split)
    assert pooled.classes == ["a", "b", "c"] and pooled.labels.tolist() == [0, 1, 2, 0]
    with pytest.raises(UserError, match=r"^--data d: the classes differ \(in the model, not in the data: d\)$"):
        match_classes(split, ["a", "b", "c", "d"], "--data d")


def _reversed(checkpoint):
    """The same cnn3 with its classes listed in reverse order (its head's rows reversed with them)."""
    head = [key for key in checkpoint["state_dict"] if key.startswith("fc.")]
    assert head
    return {**checkpoint, "classes": checkpoint["classes"][::-1],
            "state_dict": {**checkpoint["state_dict"], **{k: checkpoint["state_dict"][k].flip(0) for k in head}}}


def test_an_ensemble_member_with_the_classes_in_another_order_is_put_in_the_first_members_order(target_run, tmp_path):
    """A member whose head lists the same classes reversed is put in the first member's order: the
    ensemble gives the probabilities of the ensemble of the same two models in one order. (A model
    and its own reversed copy is one model twice, which ensembles refuse.)"""
    first = load_checkpoint(target_run / "best.pt")
    generator = torch.Generator().manual_seed(0)
    second = {**first, "state_dict": {key: value + 0.05 * torch.randn(value.shape, generator=generator)
                                      if value.is_floating_point() else value
                                      for key, value in first["state_dict"].items()}}
    paths = [tmp_path / "a.pt", tmp_path / "b.pt"]
    for path, member in zip(paths, (first, second)):
        save_checkpoint(member, path)
    images = torch.randn(4, 3, first["image_size"], first["image_size"])
    expected = torch.softmax(build_from_checkpoint(ensemble_checkpoint(paths, [first, second]))(images), 1)
    reversed_member = _reversed(second)
    combined = ensemble_checkpoint(paths, [first, reversed_member])
    assert combined["classes"] == first["classes"]
    torch.testing.assert_close(torch.softmax(build_from_checkpoint(combined)(images), 1), expected)
    renamed = {**reversed_member, "classes": ["other", *reversed_member["classes"][1:]]}
    with pytest.raises(UserError, match=rf"member .*b.pt: the classes differ \(in .*b.pt, not in .*a.pt: other; "
                                        rf"in .*a.pt, not in .*b.pt: {first['classes'][-1]}\)$"):
        ensemble_checkpoint(paths, [first, renamed])


def test_explain_compares_a_model_with_its_classes_in_another_order(target_run, demo_data, tmp_path):
    save_checkpoint(_reversed(load_checkpoint(target_run / "best.pt")), tmp_path / "reversed.pt")
    run_main("explain.py", "--compare", target_run / "best.pt", tmp_path / "reversed.pt", "--data", demo_data,
             "--task", "target", "--num-images", "3", "--out", tmp_path / "cam")
    a, b = json.loads((tmp_path / "cam" / "cam_stats.json").read_text())["models"]
    assert [(i["pred"], i["prob"], i["map_of"]) for i in a["images"]] == \
           [(i["pred"], i["prob"], i["map_of"]) for i in b["images"]], "the same model under either class order"
