"""train.py and the training loop (lib.engine) on the demo data: learning, exact resume, both layouts."""
import csv
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_main, run_script
from lib import engine
from lib.checkpoint import load_checkpoint
from lib.data import Split, load_split
from lib.demo import TARGET_CLASSES
from lib.engine import fit
from lib.errors import UserError
from lib.evaluation import load_predictor
from lib.metrics import epoch_metrics
from lib.models import CNN3_MIN_SIZE, build_model
from lib.recipe import TrainConfig


def test_training_beats_chance_and_writes_everything(demo_data, tmp_path):
    out = tmp_path / "run"
    run_script("train.py", "--data", demo_data, "--task", "target", "--model", "cnn3",
               "--epochs", "8", "--lr", "3e-3", "--augment", "light", "--out", out)
    for name in ("model.pt", "best.pt", "last.pt", "metrics.csv", "curves.png"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 9))
    # --eval-every 2 (the default) validates epochs 2, 4, 6 and 8 only.
    assert [r["val_auroc"] != "" for r in rows] == [epoch % 2 == 0 for epoch in range(1, 9)]
    best = max(float(r["val_auroc"]) for r in rows if r["val_auroc"])
    assert best > 0.8, f"val AUROC {best} is not clearly above chance (0.5)"


def test_both_layouts_load(demo_data, tmp_path):
    csv_split = load_split(demo_data, "val", "target")
    assert csv_split.classes == TARGET_CLASSES
    assert csv_split.images.dtype == torch.uint8 and csv_split.images.shape[1:] == (3, 64, 64)
    # The same images rearranged as torchvision's ImageFolder, one as grayscale, one as RGBA
    # and one larger, to check conversion and resizing.
    conversions = {0: lambda image: image.convert("L"), 1: lambda image: image.convert("RGBA"),
                   2: lambda image: image.resize((100, 80))}
    for i, (name, label) in enumerate(zip(csv_split.filenames, csv_split.labels.tolist())):
        folder = tmp_path / "val" / csv_split.classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.open(demo_data / "images" / name)
        conversions.get(i, lambda image: image)(image).save(folder / name)
    folder_split = load_split(tmp_path, "val")
    assert folder_split.classes == sorted(TARGET_CLASSES), "ImageFolder classes are sorted folder names"
    assert folder_split.classes != TARGET_CLASSES, "the two layouts must number the classes differently"
    assert folder_split.images.shape == csv_split.images.shape
    # File by file: a label or an image swapped between files would pass a count of classes.
    found = {Path(f).name: (folder_split.classes[label], image)
             for f, label, image in zip(folder_split.filenames, folder_split.labels.tolist(), folder_split.images)}
    assert sorted(found) == sorted(csv_split.filenames)
    for i, (name, label, original) in enumerate(zip(csv_split.filenames, csv_split.labels.tolist(),
                                                    csv_split.images)):
        class_name, image = found[name]
        assert class_name == csv_split.classes[label], name
        if i == 0:
            gray = torch.from_numpy(np.array(Image.open(demo_data / "images" / name).convert("L")))
            assert all(torch.equal(image[c], gray) for c in range(3)), "grayscale becomes three equal channels"
        elif i == 2:
            saved = Image.open(tmp_path / "val" / class_name / name)
            assert saved.size == (100, 80)
            expected = torch.from_numpy(np.array(saved.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR)))
            assert torch.equal(image, expected.permute(2, 0, 1)), "resized bilinearly to --image-size"
            assert (image.float() - original.float()).abs().mean() < 10, "still the same picture"
        else:
            assert torch.equal(image, original), f"{name}: RGBA and RGB files give the original pixels"


def test_imagefolder_numbers_classes_by_train_and_warns_about_loose_images(demo_data, tmp_path, capsys):
    picture = Image.open(next((demo_data / "images").glob("*.png")))
    for name in ("a_first", "b_second", "c_third"):
        (tmp_path / "train" / name).mkdir(parents=True)
        picture.save(tmp_path / "train" / name / "1.png")
    # val/ lacks the first class: its labels must still be train/'s numbers, not 0 and 1.
    for name in ("b_second", "c_third"):
        (tmp_path / "val" / name).mkdir(parents=True)
        picture.save(tmp_path / "val" / name / f"{name}.png")
    picture.save(tmp_path / "val" / "loose.png")
    split = load_split(tmp_path, "val")
    assert split.classes == ["a_first", "b_second", "c_third"]
    assert dict(zip(split.filenames, split.labels.tolist())) == {"val/b_second/b_second.png": 1,
                                                                 "val/c_third/c_third.png": 2}
    warning = capsys.readouterr().err
    assert "1 image file(s) beside the class folders" in warning and "loose.png" in warning, warning


def test_train_runs_on_imagefolder_layout(demo_data, tmp_path):
    data = tmp_path / "data"
    for split in ("train", "val"):
        part = load_split(demo_data, split, "target")
        for name, label in zip(part.filenames, part.labels.tolist()):
            folder = data / split / part.classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(demo_data / "images" / name, folder / name)
    result = run_script("train.py", "--data", data, "--model", "cnn3", "--epochs", "1", "--out", tmp_path / "run")
    assert load_checkpoint(tmp_path / "run" / "best.pt")["classes"] == sorted(TARGET_CLASSES)
    first = result.stdout.splitlines()[0]
    assert first.startswith(f"cnn3 on {data}: 80 train / 60 val images"), "ImageFolder data has no task: name the folder"


def test_bad_data_gives_one_line_error(tmp_path):
    missing = run_script("train.py", "--data", tmp_path / "nope", "--task", "source", "--out", tmp_path / "o",
                         check=False)
    assert missing.returncode == 2 and "nope" in missing.stderr and "Traceback" not in missing.stderr
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "landmarks.csv").write_text("filename,partition,task\nx.png,train,source\n")
    malformed = run_main("train.py", "--data", tmp_path / "bad", "--task", "source", "--out", tmp_path / "o",
                         check=False)
    assert malformed.returncode == 2 and "semantic_label" in malformed.stderr
    assert "Traceback" not in malformed.stderr and len(malformed.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("model, sizes", [("cnn3", (CNN3_MIN_SIZE, 32, 48, 56, 64, 80, 100)),
                                          ("resnet18", (CNN3_MIN_SIZE, 48))])
def test_models_build_and_run_at_any_image_size(model, sizes):
    for size in sizes:
        net = build_model(model, 3, size).eval()
        with torch.no_grad():
            assert net(torch.zeros(2, 3, size, size)).shape == (2, 3), f"{model} at {size}px"
    if model == "cnn3":
        with pytest.raises(UserError, match=f"--image-size {CNN3_MIN_SIZE - 1}: too small for cnn3"):
            build_model(model, 3, CNN3_MIN_SIZE - 1)


def _tiny_split(n=8, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)
    return Split(images, torch.arange(n) % 2, ["a", "b"], [str(i) for i in range(n)])


def _describe(size=32):
    return {"model": "cnn3", "task": None, "classes": ["a", "b"], "image_size": size, "mean": [0.5] * 3,
            "std": [0.25] * 3, "args": {"data": "tiny"}}


def test_gradient_scaler_state_is_saved_and_restored(tmp_path, monkeypatch):
    """The CUDA float16 path's loss scale, with PyTorch's CPU GradScaler standing in for CUDA's
    (same class and state): it doubles after every step here, so a resume that forgot it
    would end with a different scale than an uninterrupted run."""
    monkeypatch.setattr(engine, "make_scaler",
                        lambda device, amp: torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1))
    split = _tiny_split()  # 8 images in batches of 4: two steps per epoch

    def run(out, epochs, resume=False):
        torch.manual_seed(0)
        fit(build_model("cnn3", 2, 32), split, split, describe=_describe(),
            config=TrainConfig(epochs=epochs, min_steps=0, batch_size=4, augment="none", scheduler="none"), out=out,
            device=torch.device("cpu"), seed=0, resume=resume)
        return load_checkpoint(out / "last.pt")

    assert run(tmp_path / "a", 1)["training"]["scaler"]["scale"] == 2.0 ** 12
    resumed = run(tmp_path / "a", 2, resume=True)["training"]
    uninterrupted = run(tmp_path / "b", 2)["training"]
    assert resumed["scaler"] == uninterrupted["scaler"] and resumed["scaler"]["scale"] == 2.0 ** 14
    for name, tensor in uninterrupted["raw_state_dict"].items():
        assert torch.equal(tensor, resumed["raw_state_dict"][name]), name


def test_validation_is_float32_so_evaluation_reproduces_best_pt(demo_data, tmp_path):
    # Trained with mixed precision (bfloat16 on CPU, whatever the CPU), selected on float32
    # numbers: those of evaluate.py's predictor for the same weights.
    out = tmp_path / "amp"
    run_script("train.py", "--data", demo_data, "--task", "target", "--model", "cnn3", "--epochs", "2",
               "--augment", "none", "--amp", "on", "--out", out)
    assert load_checkpoint(out / "last.pt")["args"]["amp"] == "on"
    best = load_checkpoint(out / "best.pt")["metrics"]
    val = load_split(demo_data, "val", "target")
    expected = epoch_metrics(val.labels, load_predictor(out / "best.pt", torch.device("cpu")).predict(val.images))
    assert best["val_accuracy"] == expected["accuracy"]
    assert best["val_auroc"] == pytest.approx(expected["auroc"], abs=1e-6)
    # Equal here to the last bit; the tolerance leaves room for float32 summation order on
    # other CPUs, and is 10x below what bfloat16 validation moved this loss (2e-5).
    assert best["val_loss"] == pytest.approx(expected["loss"], rel=2e-6)


def test_divergence_is_a_one_line_error(tmp_path):
    # SGD at lr 1e30 blows the weights up in the first step; the second step's loss is NaN.
    with pytest.raises(UserError, match=r"training diverged at epoch 1 \(loss nan\); lower --lr"):
        fit(build_model("cnn3", 2, 32), _tiny_split(), _tiny_split(), describe=_describe(),
            config=TrainConfig(epochs=1, min_steps=0, batch_size=4, optimizer="sgd", lr=1e30, augment="none"),
            out=tmp_path, device=torch.device("cpu"), seed=0)


# --- resume repeats the run exactly (what it compares: test_checkpoint.py) ----------------------------


def _split_of(n, size, seed):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)
    return Split(images, torch.arange(n) % 2, ["a", "b"], [str(i) for i in range(n)])


def test_resume_is_exact_for_a_model_with_dropout(tmp_path):
    """MobileNetV3-Small has dropout before its classifier. Counting FLOPs of a training step (at a
    size not counted yet in this process: after epoch 2 of the resumed one, but not of the
    uninterrupted one, which counted 32 px after epoch 1) must not draw from the run's generator."""
    split = _split_of(8, 32, 0)
    describe = {**_describe(), "model": "mobilenet_v3_small"}
    config = TrainConfig(epochs=3, min_steps=0, batch_size=4, augment="none", min_size=0, eval_every=1, ema=0.0)

    def run(out, resume=False, monitor=None):
        torch.manual_seed(0)
        fit(build_model("mobilenet_v3_small", 2, 32), split, split, describe=describe, config=config, out=out,
            device=torch.device("cpu"), seed=0, resume=resume, monitor=monitor)
        return load_checkpoint(out / "last.pt")

    def interrupt(epoch, model):
        if epoch == 1:
            raise KeyboardInterrupt

    uninterrupted = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", monitor=interrupt)
    resumed = run(tmp_path / "b", resume=True)
    assert [r["train_loss"] for r in resumed["history"]] == [r["train_loss"] for r in uninterrupted["history"]]
    for name, tensor in uninterrupted["training"]["raw_state_dict"].items():
        assert torch.equal(tensor, resumed["training"]["raw_state_dict"][name]), name
    assert torch.equal(resumed["training"]["rng"]["torch"], uninterrupted["training"]["rng"]["torch"])


def test_a_class_whose_only_image_is_left_out_of_an_epoch_trains_on(tmp_path):
    """9 images in batches of 4: the last batch of one image is dropped (BatchNorm). Class b has one
    training image; in the epoch where the shuffle puts it last, the epoch's batches hold class a
    only. Its training AUROC is nan (no AUROC exists for one class), not the end of the run."""
    labels = torch.zeros(9, dtype=torch.int64)
    labels[4] = 1
    train = Split(_split_of(9, 32, 0).images, labels, ["a", "b"], [str(i) for i in range(9)])
    seed = next(s for s in range(100) if all(4 not in b for b in engine._epoch_batches(train, s, 1, 4)))
    fit(build_model("cnn3", 2, 32), train, _tiny_split(), describe=_describe(), out=tmp_path,
        device=torch.device("cpu"), seed=seed, config=TrainConfig(epochs=1, min_steps=0, batch_size=4, augment="none"))
    [row] = load_checkpoint(tmp_path / "last.pt")["history"]
    assert math.isnan(row["train_auroc"]) and math.isfinite(row["train_loss"]) and math.isfinite(row["val_auroc"])
    assert epoch_metrics([0, 1], [[0.8, 0.2], [0.3, 0.7]])["auroc"] == 1.0


def test_a_channel_constant_over_the_training_split_trains(tmp_path):
    # Every photo's blue is 0: its std was 0 and every input NaN, "training diverged" at any --lr.
    for split, count in (("train", 4), ("val", 2)):
        for label in ("a", "b"):
            (tmp_path / "d" / split / label).mkdir(parents=True)
            for i in range(count):
                rgb = np.random.default_rng([i, count, ord(label)]).integers(0, 256, (32, 32, 3), dtype=np.uint8)
                rgb[..., 2] = 0
                Image.fromarray(rgb).save(tmp_path / "d" / split / label / f"{i}.png")
    out = tmp_path / "run"
    run_main("train.py", "--data", tmp_path / "d", "--model", "cnn3", "--image-size", "32", "--epochs", "1",
             "--batch-size", "4", "--no-pixel-cache", "--out", out)
    checkpoint = load_checkpoint(out / "last.pt")
    assert checkpoint["std"][2] == 1.0 and math.isfinite(checkpoint["metrics"]["train_loss"])
    # A std of 0 given by hand is refused in one line.
    refused = run_main("train.py", "--data", tmp_path / "d", "--model", "cnn3", "--mean", "0.5", "0.5", "0.5",
                       "--std", "0.2", "0.2", "0", "--out", tmp_path / "other", check=False)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "argument --std: must be greater than 0, got 0" in refused.stderr
    for flag, values, message in (("--std", ["0.2", "0.2", "inf"], "argument --std: must be a finite number, got inf"),
                                  ("--mean", ["0.5", "nan", "0.5"], "argument --mean: must be a finite number, got nan")):
        other = {"--std": ["--mean", "0.5", "0.5", "0.5"], "--mean": ["--std", "0.2", "0.2", "0.2"]}[flag]
        refused = run_main("train.py", "--data", tmp_path / "d", *other, flag, *values, "--out", tmp_path / "o",
                           check=False)
        assert refused.returncode == 2 and message in refused.stderr and len(refused.stderr.splitlines()) == 1
