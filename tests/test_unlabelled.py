"""Learning from unlabelled photos (--unlabelled challenge or a folder): FixMatch's loss, the log and
the checkpoint, refusals."""
import csv
import shutil

import pytest
import torch

from conftest import run_main
from lib.checkpoint import load_checkpoint
from lib.unlabelled import pseudo_label_loss


def test_pseudo_labels_count_only_where_the_weak_view_is_confident():
    weak = torch.tensor([[5.0, 0.0], [0.1, 0.0], [0.0, 4.0]], requires_grad=True)
    strong = torch.tensor([[0.0, 1.0], [2.0, 0.0], [1.0, 0.0]], requires_grad=True)
    loss, used = pseudo_label_loss(weak, strong, threshold=0.9)
    expected = (torch.nn.functional.cross_entropy(strong[[0, 2]], torch.tensor([0, 1]), reduction="sum") / 3)
    assert used == 2 and loss.item() == pytest.approx(expected.item())
    loss.backward()
    assert weak.grad is None or not weak.grad.any(), "the weak view only labels"
    assert not strong.grad[1].any() and strong.grad[0].any() and strong.grad[2].any()


def metrics_column(path, column):
    with open(path, newline="") as f:
        return [float(row[column]) for row in csv.DictReader(f)]


def test_challenge_photos_share_used_and_threshold_in_log_and_checkpoint(demo_data, tmp_path):
    common = ["--data", demo_data, "--task", "target", "--model", "cnn3", "--epochs", "2", "--unlabelled", "challenge"]
    everything = run_main("train.py", *common, "--threshold", "0", "--unlabelled-weight", "0.5",
                          "--out", tmp_path / "all")
    assert "unlabelled: 20 photos (challenge), pseudo-labels from probability 0.0 up, weight 0.5" in everything.stdout
    assert "unlabelled used 100%" in everything.stdout
    assert metrics_column(tmp_path / "all" / "metrics.csv", "unlabelled_used") == [1.0, 1.0]
    entry = load_checkpoint(tmp_path / "all" / "model.pt")["unlabelled"]
    assert entry == {"photos": "challenge", "data": str(demo_data.resolve()), "images": 20, "threshold": 0.0,
                     "weight": 0.5, "weak": "light", "strong": "strong"}
    # A barely trained network is never certain: at threshold 1 no pseudo-label counts.
    run_main("train.py", *common, "--threshold", "1", "--out", tmp_path / "none")
    assert metrics_column(tmp_path / "none" / "metrics.csv", "unlabelled_used") == [0.0, 0.0]
    resumed = run_main("train.py", *common, "--threshold", "0.5", "--unlabelled-weight", "0.5", "--resume",
                       "--out", tmp_path / "all", check=False)
    assert resumed.returncode == 2 and "--threshold" in resumed.stderr, resumed.stderr


def test_transfer_learns_from_a_folder_of_photos_and_refuses_an_empty_one(demo_data, source_run, tmp_path):
    photos = tmp_path / "photos"
    for i, image in enumerate(sorted((demo_data / "images").glob("*.png"))[:12]):
        (photos / f"day-{i % 3}").mkdir(parents=True, exist_ok=True)
        shutil.copy(image, photos / f"day-{i % 3}" / image.name)
    (photos / "notes.txt").write_text("not a photo")
    run_main("transfer.py", "--source", source_run / "model.pt", "--data", demo_data, "--task", "target",
             "--epochs", "1", "--unlabelled", photos, "--out", tmp_path / "target")
    entry = load_checkpoint(tmp_path / "target" / "model.pt")["unlabelled"]
    assert entry["images"] == 12 and entry["data"] == str(photos.resolve()) and entry["threshold"] == 0.95
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("not a photo")
    for folder, message in ((tmp_path / "empty", "no images in it or its subfolders"),
                            (tmp_path / "missing", "no such folder")):
        refused = run_main("transfer.py", "--source", source_run / "model.pt", "--data", demo_data, "--task",
                           "target", "--unlabelled", folder, "--out", tmp_path / "o", check=False)
        assert refused.returncode == 2 and f"--unlabelled {folder}: {message}" in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
