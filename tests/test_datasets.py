"""Several datasets in one run (--data A B): classes matched by name, labels remapped, lineage."""
import shutil

import pytest
import torch

from conftest import run_main
from lib.checkpoint import load_checkpoint
from lib.data import channel_stats, load_datasets, load_split
from lib.demo import SOURCE_CLASSES, TARGET_CLASSES


def copy_as_imagefolder(demo_data, root, task, per_class, extra_class=None):
    """The first per_class images of each class of the demo's `task` (train and val) as an ImageFolder
    (classes in alphabetical order, unlike the CSV's); extra_class adds a class folder of one image's copies."""
    for split in ("train", "val"):
        part = load_split(demo_data, split, task)
        for label, name in enumerate(part.classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for filename in [f for f, l in zip(part.filenames, part.labels.tolist()) if l == label][:per_class]:
                shutil.copy(demo_data / "images" / filename, folder / filename)
        if extra_class:
            (root / split / extra_class).mkdir()
            for i in range(2):
                shutil.copy(demo_data / "images" / part.filenames[0], root / split / extra_class / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def target_folder(demo_data, tmp_path_factory):
    return copy_as_imagefolder(demo_data, tmp_path_factory.mktemp("folder"), "target", 6)


def test_combined_split_keeps_the_first_datasets_class_order_and_remaps_the_others(demo_data, target_folder):
    csv, folder = load_split(demo_data, "train", "target"), load_split(target_folder, "train")
    assert csv.classes == TARGET_CLASSES and folder.classes == sorted(TARGET_CLASSES) != TARGET_CLASSES
    both = load_datasets([demo_data, target_folder], "train", "target")
    assert both.classes == TARGET_CLASSES and len(both) == len(csv) + len(folder)
    assert torch.equal(both.images[:], torch.cat([csv.images, folder.images]))
    tail = both.labels[len(csv):]
    assert [both.classes[label] for label in tail.tolist()] == [name.split("/")[1] for name in folder.filenames], \
        "each folder image keeps its class name, under the CSV's number"
    assert torch.equal(both.labels[:len(csv)], csv.labels)
    assert both.filenames[0] == f"{demo_data.name}/{csv.filenames[0]}"
    assert both.mean == pytest.approx(channel_stats(both.images[:])[0])
    assert both.std == pytest.approx(channel_stats(both.images[:])[1])


def test_train_on_two_datasets_records_both_and_export_reads_the_first(demo_data, target_folder, tmp_path):
    result = run_main("train.py", "--data", demo_data, target_folder, "--task", "target", "--model", "cnn3",
                      "--epochs", "1", "--out", tmp_path / "run")
    assert f"{demo_data} + {target_folder}, task target: 92 train / 72 val images" in result.stdout.splitlines()[0]
    checkpoint = load_checkpoint(tmp_path / "run" / "model.pt")
    assert checkpoint["classes"] == TARGET_CLASSES
    assert checkpoint["lineage"]["data"] == [str(demo_data.resolve()), str(target_folder.resolve())]
    assert checkpoint["args"]["data"] == [str(demo_data), str(target_folder)]
    from lib.image_sets import reference_images
    images, labels, where = reference_images(checkpoint, None, "val")
    assert where["data"] == str(demo_data.resolve()) and len(labels) == 60
    from lib.evaluation import load_predictor
    predictor = load_predictor(tmp_path / "run" / "model.pt", torch.device("cpu"))
    assert list(predictor.preprocessing.classes) == TARGET_CLASSES


def test_one_dataset_is_stored_as_before(demo_data, target_run):
    checkpoint = load_checkpoint(target_run / "model.pt")
    assert checkpoint["args"]["data"] == str(demo_data)
    assert checkpoint["lineage"]["data"] == [str(demo_data.resolve())]


def test_transfer_and_crossval_take_several_datasets(demo_data, target_folder, source_run, tmp_path):
    run_main("transfer.py", "--source", source_run / "model.pt", "--data", demo_data, target_folder,
               "--task", "target", "--epochs", "1", "--out", tmp_path / "target")
    lineage = load_checkpoint(tmp_path / "target" / "model.pt")["lineage"]
    assert lineage["data"] == [str(demo_data.resolve()), str(target_folder.resolve())] and "source_sha256" in lineage
    result = run_main("crossval.py", "--source", source_run / "model.pt", "--data", demo_data, target_folder,
                        "--task", "target", "--epochs", "1", "--folds", "2", "--out", tmp_path / "cv")
    assert "over 164 labelled images" in result.stdout


def test_refuses_a_class_in_one_dataset_only_another_task_and_a_repeat(demo_data, tmp_path):
    extra = copy_as_imagefolder(demo_data, tmp_path / "extra", "target", 2, extra_class="tower")
    source = copy_as_imagefolder(demo_data, tmp_path / "source", "source", 2)
    cases = [([demo_data, extra], f"class 'tower' is in {extra} only"),
             ([extra, demo_data], f"class 'tower' is in {extra} only"),
             ([demo_data, source], "a dataset of another task"),
             ([demo_data, demo_data], "give each dataset once")]
    for datasets, message in cases:
        result = run_main("train.py", "--data", *datasets, "--task", "target", "--out", tmp_path / "o", check=False)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert set(SOURCE_CLASSES).isdisjoint(TARGET_CLASSES)
