"""crossval.py's refusal of a source trained on the data being cross-validated: by what the data
is, not by how --data and --task were written."""
import shutil

import pytest

from conftest import run_main
from lib.checkpoint import load_checkpoint, save_checkpoint
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


def crossval(source, data, out, *task):
    return run_main("crossval.py", "--source", source, "--data", data, *task, "--folds", "2", "--epochs", "1",
                    "--out", out, check=False)


@pytest.mark.parametrize("written", ["demo", "folder"])
def test_demo_and_its_folder_are_the_same_data(target_run, demo_data, tmp_path, written):
    """target_run was trained with --data <the demo folder>; `--data demo` is the same images, and so
    is a source trained with --data demo cross-validated on the folder."""
    source, data = target_run / "best.pt", "demo"
    if written == "folder":
        source, data = trained_on(source, "demo", "target", tmp_path / "from_demo.pt"), demo_data
    result = crossval(source, data, tmp_path / "cv", "--task", "target")
    assert_clean_error(result, "--source", "already shaped it")
    assert not (tmp_path / "cv").exists()


def test_an_imagefolder_source_is_the_same_data_whatever_its_task(target_run, demo_data, tmp_path):
    folder = imagefolder_copy(demo_data, tmp_path / "photos")
    source = trained_on(target_run / "best.pt", folder, "target", tmp_path / "photos.pt")
    result = crossval(source, tmp_path / "." / "photos", tmp_path / "cv")  # no --task, the path written otherwise
    assert_clean_error(result, "--source", "already shaped it")
    assert not (tmp_path / "cv").exists()
