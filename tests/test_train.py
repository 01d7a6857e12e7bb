"""train.py on the demo data: learning, self-describing checkpoints, resume, both layouts."""
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
from lib.checkpoint import load_checkpoint, resume_mismatches
from lib.data import Split, load_split
from lib.demo import SOURCE_CLASSES, TARGET_CLASSES
from lib.engine import fit
from lib.errors import UserError
from lib.evaluation import load_predictor
from lib.metrics import epoch_metrics
from lib.models import CNN3_MIN_SIZE, build_model
from lib.recipe import TrainConfig, config_from_args, lr_factor
from lib.selection import balance_note, paired_difference, ranking_note


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


def test_checkpoint_describes_itself(source_run):
    checkpoint = torch.load(source_run / "best.pt", weights_only=True)
    assert checkpoint["model"] == "cnn3"
    assert checkpoint["classes"] == SOURCE_CLASSES
    assert checkpoint["image_size"] == 64
    assert len(checkpoint["mean"]) == 3 and all(0 < s < 1 for s in checkpoint["std"])
    assert checkpoint["args"]["task"] == "source"
    assert {"val_accuracy", "val_auroc", "val_loss"} <= set(checkpoint["metrics"])
    assert load_checkpoint(source_run / "last.pt")["epoch"] == 3


def test_lr_column_is_the_rate_each_epoch_trained_with(source_run, demo_data):
    # source_run: 3 epochs of the recipe's schedule from lr 2e-3 (a warm-up epoch, then cosine),
    # stepped every batch: the column is the mean rate of the epoch's steps, read before each
    # step, so the last epoch still trains (not 0).
    rows = list(csv.DictReader(open(source_run / "metrics.csv")))
    steps = math.ceil(len(load_split(demo_data, "train", "source")) / 64)
    expected = [2e-3 * sum(lr_factor(step / steps, "cosine", 3, 10, 0.1, 1.0)
                           for step in range((epoch - 1) * steps, epoch * steps)) / steps for epoch in (1, 2, 3)]
    assert [float(r["lr"]) for r in rows] == pytest.approx(expected, rel=1e-9)
    assert expected[0] < expected[1] and expected[2] > 0


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


def _fit_without_improvement(out, monkeypatch, resume=False, **recipe):
    """A run whose validation never improves after its first validated epoch."""
    monkeypatch.setattr(engine, "predict_probs", lambda model, images, *a, **k: torch.full((len(images), 2), 0.5))
    split = _tiny_split()
    torch.manual_seed(0)
    fit(build_model("cnn3", 2, 32), split, split, describe=_describe(), out=out, device=torch.device("cpu"), seed=0,
        config=TrainConfig(batch_size=4, min_steps=0, augment="none", ema=0.0, **recipe), resume=resume)
    return load_checkpoint(out / "last.pt")


@pytest.mark.parametrize("eval_every, validated", [(1, [1, 2, 3, 4]), (2, [2, 4, 5])])
def test_early_stopping_counts_epochs_without_improvement(tmp_path, monkeypatch, eval_every, validated):
    # --patience 3 counts epochs, whatever --eval-every: the first validated epoch stays the best,
    # so the run ends 3 epochs after it, and that last epoch is validated too (with --eval-every 2:
    # after epoch 5, not 6). A constant learning rate falls no further, so stopping is allowed.
    last = _fit_without_improvement(tmp_path, monkeypatch, epochs=10, patience=3, scheduler="none",
                                    eval_every=eval_every, warmup_epochs=0)
    history = last["history"]
    assert [row["epoch"] for row in history] == list(range(1, validated[0] + 4))
    assert [row["epoch"] for row in history if row["val_loss"] is not None] == validated
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == validated[0]
    assert load_checkpoint(tmp_path / "model.pt")["epoch"] == validated[0]
    resumed = _fit_without_improvement(tmp_path, monkeypatch, resume=True, epochs=10, patience=3, scheduler="none",
                                       eval_every=eval_every, warmup_epochs=0)
    assert resumed["history"] == history, "a resumed run that had stopped must not train on"


def test_early_stopping_waits_for_the_learning_rate_to_fall(tmp_path, monkeypatch):
    # Cosine over 10 epochs: the rate is still 35% of its peak after epoch 6 and 21% after
    # epoch 7, so patience 2 ends the run after epoch 7 (not 3); --select last ships epoch 7.
    last = _fit_without_improvement(tmp_path, monkeypatch, epochs=10, patience=2, eval_every=1, select="last")
    assert [row["epoch"] for row in last["history"]] == list(range(1, 8))
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 1
    model = load_checkpoint(tmp_path / "model.pt")
    assert model["epoch"] == 7 and model["selection"] == {"select": "last", "metric": "balanced_accuracy", "epoch": 7}
    assert "training" not in model and "history" not in model, "model.pt holds no training state"
    for key, tensor in last["state_dict"].items():
        assert torch.equal(model["state_dict"][key], tensor), key


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


def test_log_says_when_val_is_too_small_to_rank_epochs():
    # 20 val images; the best epoch is right on one more image than the last: a paired bootstrap
    # over the same images cannot tell them apart. On 200 images, 40 more right ones can.
    def probs(right, n):
        labels = np.arange(n) % 2
        predicted = np.where(np.arange(n) < right, labels, 1 - labels)
        return labels, np.eye(2)[predicted] * 0.8 + 0.1

    labels, last = probs(15, 20)
    _, best = probs(16, 20)
    difference, low, high = paired_difference(labels, best, last, "accuracy")
    assert difference == pytest.approx(0.05) and low <= 0 <= high
    assert "too small to rank them" in ranking_note(labels, 4, best, 6, last, "accuracy")
    labels, last = probs(120, 200)
    _, best = probs(160, 200)
    assert "tells them apart" in ranking_note(labels, 4, best, 6, last, "accuracy")
    assert ranking_note(labels, 6, best, 6, best, "accuracy") is None


def test_log_says_when_accuracy_selects_on_an_unbalanced_val_split():
    assert "unbalanced (class sizes 10 to 30)" in balance_note(torch.tensor([0] * 30 + [1] * 10), 2, "accuracy")
    assert "ranked by balanced_accuracy, which weighs every class alike" in balance_note(
        torch.tensor([0] * 30 + [1] * 10), 2, "balanced_accuracy")
    assert balance_note(torch.tensor([0] * 12 + [1] * 10), 2, "accuracy") is None


# --- resume: what it compares, and that it repeats the run exactly ---------------------------------

def test_resume_compares_every_flag_that_shapes_training():
    """Every flag of train.py, transfer.py and crossval.py is compared on --resume unless it is
    one of the few named free; so a flag added later is compared without being listed."""
    import crossval
    import train
    import transfer
    from lib.checkpoint import FREE_ON_RESUME
    for script in (train, transfer, crossval):
        parser = script.get_args_parser()
        args = {action.dest: action.default for action in parser._actions if action.dest != "help"}
        run = {"model": "cnn3", "classes": ["a", "b"], "args": args}
        for key in args:
            if key in FREE_ON_RESUME or key in ("data", "source", "freeze", "weights", "model", "stem",
                                                "image_size", "resize", "task"):  # compared as resolved
                continue
            changed = {**run, "args": {**args, key: "another value"}}
            assert resume_mismatches(run, changed) == ["--" + key.replace("_", "-")], (script.__name__, key)
    # The free ones really are few, and none of them says what the network learns from.
    assert {"mean", "std", "max_image_pixels", "skip_bad_images", "lr", "epochs", "folds"}.isdisjoint(FREE_ON_RESUME)


@pytest.mark.parametrize("changed, had", [
    (["--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25"], "no --mean, no --std"),
    (["--max-image-pixels", "0"], "--max-image-pixels 89478485"),
    (["--skip-bad-images"], "no --skip-bad-images"),
])
def test_resume_refuses_other_normalisation_or_image_set(demo_data, tmp_path, changed, had):
    # One epoch of a 2-epoch run is enough; --epochs differs too, so the line names both.
    out = tmp_path / "run"
    common = ["--data", demo_data, "--task", "target", "--model", "cnn3", "--out", out]
    run_main("train.py", *common, "--epochs", "1")
    before = (out / "last.pt").read_bytes()
    result = run_main("train.py", *common, "--epochs", "2", "--resume", *changed, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
    flags = [word for word in changed if word.startswith("--")]
    assert f"belongs to a run with different {', '.join(flags + ['--epochs'])} (it had {had}, --epochs 1)" \
        in result.stderr, result.stderr
    assert (out / "last.pt").read_bytes() == before


def test_resume_says_when_the_data_changed_under_the_run():
    # Same flags, same folder, same classes, but the training split's statistics moved: its files changed.
    run = {"model": "cnn3", "classes": ["a", "b"], "mean": [0.4] * 3, "std": [0.2] * 3, "args": {"data": "demo"}}
    assert resume_mismatches(run, {**run, "mean": [0.41] * 3}) == ["--data"]
    assert resume_mismatches(run, dict(run)) == []


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


@pytest.mark.parametrize("script", ["train.py", "transfer.py", "crossval.py"])
def test_patience_none_turns_early_stopping_off(script):
    import importlib
    parser = importlib.import_module(script[:-3]).get_args_parser()
    required = {"train.py": [], "transfer.py": ["--source", "s.pt"], "crossval.py": ["--source", "s.pt"]}[script]
    args = parser.parse_args(["--data", "demo", "--out", "o", *required, "--patience", "none"])
    assert args.patience is None
    assert config_from_args(args, torch.device("cpu")).patience is None
    assert parser.parse_args(["--data", "demo", "--out", "o", *required, "--patience", "3"]).patience == 3
    assert "none: never stop early" in " ".join(parser.format_help().split())
    refused = run_main(script, "--data", "demo", "--out", "o", *required, "--patience", "0", check=False)
    assert refused.returncode == 2 and "--patience: must be a positive integer or none, got 0" in refused.stderr
