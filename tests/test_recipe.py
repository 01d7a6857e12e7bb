"""The fast recipe's parts: FLOP accounting, progressive resizing, the learning-rate schedule,
weight averaging, validation every few epochs, stem variants, and cross-validation."""
import csv
import dataclasses
import json
import shutil

import pytest
import torch

from conftest import run_main, run_script
from lib import crossval, engine, flops
from lib.augment import augment_batch
from lib.checkpoint import FORMAT, build_from_checkpoint, load_checkpoint
from lib.data import Split, load_split
from lib.engine import fit
from lib.errors import UserError
from lib.metrics import epoch_metrics
from lib.models import build_model, resolve_stem
from lib.recipe import (RECIPES, TrainConfig, config_from_args, config_lr_factor, ema_weight, lr_factor, make_ema,
                        train_size)


def test_learning_rate_schedules_warm_up_and_decay():
    assert lr_factor(0, "cosine", 10, 3, 0.1, 0) == 1 and lr_factor(10, "cosine", 10, 3, 0.1, 0) == pytest.approx(0)
    assert lr_factor(5, "cosine", 10, 3, 0.1, 0) == pytest.approx(0.5)
    assert lr_factor(2.5, "linear", 10, 3, 0.1, 0) == pytest.approx(0.75)
    assert lr_factor(6.9, "step", 10, 3, 0.1, 0) == pytest.approx(0.01)
    assert lr_factor(0.5, "linear", 10, 3, 0.1, 1) == pytest.approx(0.5 * 0.95, rel=1e-2)
    ramp = [lr_factor(t / 4, "none", 10, 3, 0.1, 1) for t in range(8)]
    assert ramp == sorted(ramp) and ramp[0] < 0.01 and ramp[4:] == [1.0] * 4


def test_onecycle_follows_torch_one_cycle_lr():
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    steps = 200
    reference = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1.0, total_steps=steps + 1)
    # OneCycleLR ends its rise at step 0.3 * total_steps - 1; ours at 30% of a continuous run.
    peak = 0.3 * (steps + 1) - 1
    for step in range(steps + 1):
        progress = 0.3 * step / peak if step <= peak else 0.3 + 0.7 * (step - peak) / (steps - peak)
        assert lr_factor(progress * 10, "onecycle", 10, 3, 0.1, 0) == pytest.approx(
            optimizer.param_groups[0]["lr"], abs=1e-9)
        optimizer.step()
        if step < steps:
            reference.step()



def test_onecycle_gets_no_warm_up_on_top_of_its_own():
    # --scheduler onecycle with the recipe's default --warmup-epochs 1: the first epoch starts at
    # OneCycleLR's lr/25 and rises as OneCycleLR does, not from 0 (its help says so).
    config = TrainConfig(scheduler="onecycle", epochs=10)
    assert config.warmup_epochs == 1.0
    for t in (0, 0.1, 0.5, 0.99, 1, 5):
        assert config_lr_factor(t, config) == lr_factor(t, "onecycle", 10, 3, 0.1, 0)
    assert config_lr_factor(0, config) == pytest.approx(1 / 25)

def test_progressive_resizing_grows_to_full_size_and_augment_resizes():
    sizes = [train_size(epoch, 12, 32, 64) for epoch in range(1, 13)]
    assert sizes[0] == 32 and sizes[-4:] == [64] * 4 and sizes == sorted(sizes)
    assert all(s % 8 == 0 for s in sizes)
    # The recipe's 20 epochs, as before the fix for other sizes: 64 px from epoch 14 on.
    assert [train_size(e, 20, 32, 64) for e in range(1, 21)] == [32, 32, 40, 40, 40, 40, 48, 48, 48, 56,
                                                                56, 56, 56] + [64] * 7
    assert [train_size(e, 5, None, 64) for e in range(1, 6)] == [64] * 5
    for epochs in range(1, 41):
        for image_size, min_size in ((64, 32), (68, 32), (100, 32), (227, 16), (64, 20), (64, 60)):
            sizes = [train_size(e, epochs, min_size, image_size) for e in range(1, epochs + 1)]
            full = sum(size == image_size for size in sizes)
            assert sizes[-1] == image_size and full >= epochs / 4, (epochs, image_size, min_size, sizes)
            assert min(sizes) >= min_size and max(sizes) == image_size and sizes == sorted(sizes)
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    for preset in ("none", "standard"):
        out = augment_batch(images, preset, torch.Generator().manual_seed(0), size=40)
        assert out.shape == (4, 3, 40, 40) and 0 <= out.min() and out.max() <= 1


@pytest.fixture(scope="module")
def tiny_imagefolder(demo_data, tmp_path_factory):
    """8 train and 4 val images of the demo target task, as an ImageFolder: enough for a few
    fastnet steps at large sizes."""
    root = tmp_path_factory.mktemp("tiny")
    for split, count in (("train", 8), ("val", 4)):
        part = load_split(demo_data, split, "target")
        for label in (0, 1):
            names = [n for n, l in zip(part.filenames, part.labels.tolist()) if l == label][:count // 2]
            (root / split / part.classes[label]).mkdir(parents=True)
            for name in names:
                shutil.copy(demo_data / "images" / name, root / split / part.classes[label] / name)
    return root


@pytest.mark.parametrize("image_size, min_size, epochs, expected", [
    (68, 32, 4, [32, 48, 68, 68]),
    (100, 32, 4, [32, 64, 100, 100]),
    (227, 216, 2, [216, 227]),
    (64, 32, 1, [64]),
    (64, 20, 4, [20, 40, 64, 64]),
])
def test_progressive_resizing_ends_at_full_size_through_the_script(tiny_imagefolder, tmp_path, image_size, min_size,
                                                                    epochs, expected):
    result = run_main("train.py", "--data", tiny_imagefolder, "--image-size", image_size, "--min-size", min_size,
                      "--epochs", epochs, "--batch-size", 4, "--eval-every", 99, "--out", tmp_path / "run")
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [int(r["size"]) for r in rows] == expected
    logged = [int(line.split("px")[0].split()[-1]) for line in result.stdout.splitlines() if line.startswith("epoch")]
    assert logged == expected


def test_flops_count_the_convolutions_and_skip_frozen_backward():
    model = build_model("cnn3", 2, 64)
    # 2 FLOPs per multiply-add. conv1: 16 channels at 32x32 from 5x5x3 weights; conv2: 64
    # channels at 8x8 from 5x5x16.
    conv1, conv2 = 2 * 16 * 32 * 32 * 5 * 5 * 3, 2 * 64 * 8 * 8 * 5 * 5 * 16
    assert flops.inference_flops(model, 64) > conv1
    trained = flops.training_flops(model, 64, 2)
    assert 2.5 < trained / flops.inference_flops(model, 64) < 3.5
    for parameter in model.conv1.parameters():
        parameter.requires_grad_(False)
    # Frozen, conv1 needs no weight gradient and conv2 no input gradient (nothing before it learns).
    assert flops.training_flops(model, 64, 2) == pytest.approx(trained - conv1 - conv2, rel=1e-6)


def test_grouped_convolutions_backward_is_counted_per_group():
    """A depthwise 3x3 convolution after a dense one: its backward is two convolutions of its
    own size (input and weight gradients), not dense ones (torch 2.14's flop counter ignores
    groups in the weight gradient; lib.flops corrects it)."""
    dense, depthwise = torch.nn.Conv2d(3, 32, 1, bias=False), torch.nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
    model = torch.nn.Sequential(dense, depthwise, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(32, 2, bias=False))
    dense_flops, depthwise_flops, head = 2 * 32 * 3 * 8 * 8, 2 * 32 * 9 * 8 * 8, 2 * 32 * 2
    assert flops.inference_flops(model, 8) == dense_flops + depthwise_flops + head
    # dense: forward and weight gradient (its input needs none); depthwise and head: all three.
    assert flops.training_flops(model, 8, 2) == 2 * dense_flops + 3 * depthwise_flops + 3 * head
    mobilenet = build_model("mobilenet_v3_small", 8, 128)
    assert 2.5 < flops.training_flops(mobilenet, 128, 8) / flops.inference_flops(mobilenet, 128) < 3.5


def test_metrics_report_compute_and_validation_every_few_epochs(demo_data, tmp_path):
    out = tmp_path / "run"
    result = run_main("train.py", "--data", demo_data, "--task", "target", "--model", "fastnet", "--epochs", "4",
                      "--min-size", "32", "--eval-every", "2", "--ema", "0.9", "--warmup-epochs", "1",
                      "--out", out)
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["size"]) for r in rows] == [32, 48, 64, 64]
    assert [r["val_loss"] != "" for r in rows] == [False, True, False, True], "odd epochs are not validated"
    model = build_model("fastnet", 2, 64)
    train, val = load_split(demo_data, "train", "target"), load_split(demo_data, "val", "target")
    # A validation also forwards the 64 training images (--ema-bn-images) that re-estimate the
    # average's BatchNorm statistics.
    expected = [len(train) * flops.training_flops(model, size, 2) +
                ((len(val) + 64) * flops.inference_flops(model, 64) if validated else 0)
                for size, validated in ((32, False), (48, True), (64, False), (64, True))]
    assert [float(r["tflop"]) * 1e12 for r in rows] == pytest.approx(expected, rel=1e-9)
    assert float(rows[-1]["total_tflop"]) * 1e12 == pytest.approx(sum(expected), rel=1e-9)
    [closing] = [line for line in result.stdout.splitlines() if "model.pt: epoch" in line]
    assert f"{sum(expected) / 1e12:.2f} TFLOP" in closing
    # With --ema the average is what is validated and saved as state_dict; last.pt keeps the
    # weights being trained beside it for --resume.
    training = load_checkpoint(out / "last.pt")["training"]
    last = load_checkpoint(out / "last.pt")
    averaged = {k.removeprefix("module."): v for k, v in training["ema"].items() if k.startswith("module.")}
    assert all(torch.equal(last["state_dict"][k], averaged[k]) for k in last["state_dict"])
    assert any(not torch.equal(training["raw_state_dict"][k], averaged[k]) for k in averaged)
    assert flops.inference_flops(model, 64) / 1e9 < 0.35


def test_weight_average_is_the_bias_corrected_exponential_average():
    # After t updates: sum_i d^(t-i) w_i / sum_i d^(t-i), whatever t is (no warm-up of the decay).
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema, seen = make_ema(model, 0.9), []
    for _ in range(5):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        seen.append(model.weight.detach().clone())
        ema.update_parameters(model)
    shares = torch.tensor([0.9 ** (4 - i) for i in range(5)])
    expected = sum(share * weight for share, weight in zip(shares, seen)) / shares.sum()
    assert torch.allclose(ema.module.weight, expected, atol=1e-6)
    assert ema_weight(0.9, 1) == 1 and ema_weight(0.9, 1000) == pytest.approx(0.1)


def _tiny(n=16, size=32):
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return Split(images, torch.arange(n) % 2, ["a", "b"], [str(i) for i in range(n)])


TINY = {"model": "cnn3", "task": None, "classes": ["a", "b"], "image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3,
        "args": {"data": "tiny"}}


def test_different_decays_give_different_weights_in_a_short_run(tmp_path):
    # 8 steps: the decay warm-up this replaced, min(decay, (1 + n) / (10 + n)), gave all three
    # the same weights.
    averaged = {}
    for decay in (0.9, 0.99, 0.999):
        torch.manual_seed(0)
        fit(build_model("cnn3", 2, 32), _tiny(), _tiny(), describe=TINY, out=tmp_path / str(decay),
            device=torch.device("cpu"), seed=0,
            config=TrainConfig(epochs=2, min_steps=0, batch_size=4, augment="none", ema=decay))
        averaged[decay] = load_checkpoint(tmp_path / str(decay) / "last.pt")["state_dict"]
    for a, b in ((0.9, 0.99), (0.99, 0.999), (0.9, 0.999)):
        assert all(not torch.equal(averaged[a][k], averaged[b][k]) for k in averaged[a] if "weight" in k), (a, b)


def test_best_pt_holds_the_averaged_weights_of_its_epoch(tmp_path, monkeypatch):
    # Validation is perfect at epoch 2 only, so best.pt is epoch 2 of 3, not the last.
    calls = []

    def predict(model, images, *args, **kwargs):
        calls.append(1)
        right = torch.nn.functional.one_hot(torch.arange(len(images)) % 2, 2).float()
        return right if len(calls) == 2 else torch.full((len(images), 2), 0.5)

    saved, real_save = [], engine.save_checkpoint
    monkeypatch.setattr(engine, "predict_probs", predict)
    monkeypatch.setattr(engine, "save_checkpoint", lambda checkpoint, path: (
        real_save(checkpoint, path), saved.append((path.name, torch.load(path, weights_only=True)))))
    torch.manual_seed(0)
    fit(build_model("cnn3", 2, 32), _tiny(), _tiny(), describe=TINY, out=tmp_path, device=torch.device("cpu"), seed=0,
        config=TrainConfig(epochs=3, min_steps=0, batch_size=4, augment="none", ema=0.5, eval_every=1,
                           scheduler="none"))
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["epoch"] == 2
    [last_of_epoch_2] = [c for name, c in saved if name == "last.pt" and c["epoch"] == 2]
    averaged = {k.removeprefix("module."): v for k, v in last_of_epoch_2["training"]["ema"].items()
                if k.startswith("module.")}
    assert all(torch.equal(best["state_dict"][k], averaged[k]) for k in best["state_dict"])
    assert any(not torch.equal(best["state_dict"][k], last_of_epoch_2["training"]["raw_state_dict"][k])
               for k in best["state_dict"]), "best.pt holds the average, not the weights being trained"


def test_stem_is_recorded_and_old_checkpoints_rebuild_as_they_were():
    assert resolve_stem("resnet18", 64) == "no-maxpool" and resolve_stem("resnet18", 224) == "stock"
    assert resolve_stem("fastnet", 64) == "standard"
    torch.manual_seed(0)
    stock = build_model("resnet18", 2, 64, "stock")
    base = {"format": FORMAT, "model": "resnet18", "classes": ["a", "b"], "image_size": 64, "mean": [0.5] * 3,
            "std": [0.25] * 3, "state_dict": stock.state_dict()}
    legacy = build_from_checkpoint(base)  # written before checkpoints named their stem
    assert isinstance(legacy.maxpool, torch.nn.Identity)
    rebuilt = build_from_checkpoint({**base, "stem": "stock"})
    assert isinstance(rebuilt.maxpool, torch.nn.MaxPool2d)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), stock.eval()(x))
        assert not torch.allclose(legacy(x), rebuilt(x)), "same weights, other stem: another network"


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


def test_benchmark_reports_gflops_per_precision(demo_data, tmp_path):
    out = tmp_path / "bench.json"
    result = run_script("bench/bench_train.py", "--data", demo_data, "--task", "target", "--models", "cnn3",
                        "--amp", "off", "--steps", "1", "--repeats", "1", "--warmup", "0", "--json", out)
    report = json.loads(out.read_text())
    assert list(report["models"]) == ["cnn3 float32"] and report["conditions"]["precisions"] == ["float32"]
    row = report["models"]["cnn3 float32"]
    model = build_model("cnn3", 2, 64)
    assert row["train_gflop_per_image"] == pytest.approx(flops.training_flops(model, 64, 2) / 1e9)
    assert row["bare_gflops_wall"] == pytest.approx(row["bare_wall"] * row["train_gflop_per_image"])
    assert "bare GFLOP/s" in result.stdout and "cnn3 float32" in result.stdout


def test_benchmark_runs_on_an_imagefolder_sorted_by_class(tiny_imagefolder):
    """The timed rows are spread over the split: the first rows of an ImageFolder hold one class."""
    result = run_script("bench/bench_train.py", "--data", tiny_imagefolder, "--models", "cnn3", "--amp", "off",
                        "--batch-size", "4", "--steps", "1", "--repeats", "1", "--warmup", "1")
    assert "cnn3 float32" in result.stdout


def test_recipe_plot_marks_both_defaults(tmp_path):
    table = tmp_path / "recipes.csv"
    table.write_text("setting,seed,val_accuracy,val_auroc,tflop,seconds,role\n"
                     "old,0,0.86,0.98,240,1300,old default\nnew,0,0.90,0.99,16,106,new default\n"
                     "new,1,0.89,0.99,16,106,new default\nother,0,0.88,0.987,24,160,\n")
    result = run_script("bench/plot_recipes.py", table, tmp_path / "recipes.png")
    assert "3 settings" in result.stdout and (tmp_path / "recipes.png").stat().st_size > 10_000


@pytest.mark.parametrize("script, recipe", [("train.py", "train"), ("transfer.py", "transfer"),
                                            ("crossval.py", "transfer")])
def test_each_script_trains_with_its_named_recipe_by_default(script, recipe):
    """The scripts' defaults are lib.recipe.RECIPES' records, every field (--amp auto resolved)."""
    import importlib
    required = {"train.py": [], "transfer.py": ["--source", "s.pt"], "crossval.py": ["--source", "s.pt"]}[script]
    args = importlib.import_module(script[:-3]).get_args_parser().parse_args(["--data", "demo", "--out", "o",
                                                                              *required])
    config = config_from_args(args, torch.device("cpu"))
    assert config == dataclasses.replace(RECIPES[recipe], amp=config.amp)
    assert RECIPES["train"] != RECIPES["transfer"]
