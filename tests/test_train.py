"""train.py on the demo data: learning, self-describing checkpoints, resume, both layouts."""
import csv
import shutil

import torch
from PIL import Image

from conftest import run_script
from lib.checkpoint import load_checkpoint
from lib.data import load_split
from lib.demo import SOURCE_CLASSES, TARGET_CLASSES


def test_training_beats_chance_and_writes_everything(demo_data, tmp_path):
    out = tmp_path / "run"
    run_script("train.py", "--data", demo_data, "--task", "target", "--model", "cnn3",
               "--epochs", "8", "--lr", "3e-3", "--augment", "light", "--out", out)
    for name in ("best.pt", "last.pt", "metrics.csv", "curves.png"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 9))
    best = max(float(r["val_auroc"]) for r in rows)
    assert best > 0.8, f"val AUROC {best} is not clearly above chance (0.5)"


def test_checkpoint_describes_itself(source_run):
    checkpoint = torch.load(source_run / "best.pt", weights_only=True)
    assert checkpoint["model"] == "cnn3"
    assert checkpoint["classes"] == SOURCE_CLASSES
    assert checkpoint["image_size"] == 64
    assert len(checkpoint["mean"]) == 3 and all(0 < s < 1 for s in checkpoint["std"])
    assert checkpoint["args"]["task"] == "source"
    assert {"val_accuracy", "val_auroc", "val_loss"} <= set(checkpoint["metrics"])
    assert load_checkpoint(source_run / "last.pt")["epoch"] == 3


def test_both_layouts_load(demo_data, tmp_path):
    csv_split = load_split(demo_data, "val", "target")
    assert csv_split.classes == TARGET_CLASSES
    assert csv_split.images.dtype == torch.uint8 and csv_split.images.shape[1:] == (3, 64, 64)
    # The same images rearranged as torchvision's ImageFolder, one as grayscale, one as RGBA
    # and one larger, to check conversion and resizing.
    for i, (name, label) in enumerate(zip(csv_split.filenames, csv_split.labels.tolist())):
        folder = tmp_path / "val" / csv_split.classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.open(demo_data / "images" / name)
        image = {0: image.convert("L"), 1: image.convert("RGBA"), 2: image.resize((100, 80))}.get(i, image)
        image.save(folder / name)
    folder_split = load_split(tmp_path, "val")
    assert folder_split.classes == sorted(TARGET_CLASSES), "ImageFolder classes are sorted folder names"
    names = [folder_split.classes[i] for i in folder_split.labels.tolist()]
    assert sorted(names) == sorted(csv_split.classes[i] for i in csv_split.labels.tolist())
    assert folder_split.images.shape == csv_split.images.shape


def test_train_runs_on_imagefolder_layout(demo_data, tmp_path):
    data = tmp_path / "data"
    for split in ("train", "val"):
        part = load_split(demo_data, split, "target")
        for name, label in zip(part.filenames, part.labels.tolist()):
            folder = data / split / part.classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(demo_data / "images" / name, folder / name)
    run_script("train.py", "--data", data, "--model", "cnn3", "--epochs", "1", "--out", tmp_path / "run")
    assert load_checkpoint(tmp_path / "run" / "best.pt")["classes"] == sorted(TARGET_CLASSES)


def test_bad_data_gives_one_line_error(tmp_path):
    missing = run_script("train.py", "--data", tmp_path / "nope", "--task", "source", "--out", tmp_path / "o",
                         check=False)
    assert missing.returncode == 2 and "nope" in missing.stderr and "Traceback" not in missing.stderr
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "landmarks.csv").write_text("filename,partition,task\nx.png,train,source\n")
    malformed = run_script("train.py", "--data", tmp_path / "bad", "--task", "source", "--out", tmp_path / "o",
                           check=False)
    assert malformed.returncode == 2 and "semantic_label" in malformed.stderr
    assert "Traceback" not in malformed.stderr and len(malformed.stderr.strip().splitlines()) == 1
