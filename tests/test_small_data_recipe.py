"""The recipe on what users bring: every family of the registry learns under the defaults (the weight
average's BatchNorm statistics re-estimated), a small train split gets enough updates (--min-steps),
and the closing lines say when val stayed at chance or was still improving."""
import csv
import os

import pytest
import torch

from conftest import run_main
from lib import engine, selection
from lib.data import Split
from lib.engine import fit
from lib.flops import inference_flops
from lib.models import build_model, resolve_stem
from lib.recipe import TrainConfig, passes_per_epoch, reestimate_batchnorm

# One model of each family of lib.models.FAMILIES that has BatchNorm layers, the smallest: what
# the weight average broke. Quiet, on one thread, about 2-8 s each. LANDMARK_TEST_ALL_FAMILIES=1
# adds the other families (about 5 minutes more: ViT-B/16 and VGG-11 have 86M and 129M weights to
# step). Not here: maxvit_t, whose smallest size is 224 px (about 10 CPU-minutes).
FAMILY_MODELS = [("fastnet", 32), ("resnet18", 32), ("regnet_y_400mf", 32), ("shufflenet_v2_x0_5", 32),
                 ("mobilenet_v2", 32), ("efficientnet_b0", 32), ("mobilenet_v3_small", 32), ("mnasnet0_5", 32)]
MORE_FAMILY_MODELS = [("cnn3", 32), ("convnext_tiny", 32), ("densenet121", 32), ("googlenet", 32),
                      ("inception_v3", 80), ("alexnet", 64), ("swin_t", 32), ("vgg11_bn", 32), ("vit_b_16", 32),
                      ("squeezenet1_1", 32)]
ALL_FAMILIES = os.environ.get("LANDMARK_TEST_ALL_FAMILIES") == "1"


def colour_split(n, size, seed):
    """Two classes any working model separates in a few steps: noise with a red or a blue cast."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = torch.randint(0, 100, (n, 3, size, size), generator=generator)
    images[:, 0] += 120 * (labels == 0)[:, None, None]
    images[:, 2] += 120 * (labels == 1)[:, None, None]
    return Split(images.to(torch.uint8), labels, ["red", "blue"], [str(i) for i in range(n)])


def _fit_colours(name, size, out, **recipe):
    """64 steps of the default recipe (weight average included) on 32 images of colour_split,
    validated on 64 others."""
    torch.manual_seed(0)
    stem = resolve_stem(name, size)
    describe = {"model": name, "stem": stem, "task": None, "classes": ["red", "blue"], "image_size": size,
                "mean": [0.35] * 3, "std": [0.25] * 3, "args": {}}
    return fit(build_model(name, 2, size, stem), colour_split(32, size, 0), colour_split(64, size, 1),
               describe=describe, out=out, device=torch.device("cpu"), seed=0,
               config=TrainConfig(epochs=16, min_steps=0, batch_size=8, eval_every=16, min_size=size, **recipe))


@pytest.mark.parametrize("name, size", FAMILY_MODELS + (MORE_FAMILY_MODELS if ALL_FAMILIES else []))
def test_every_family_learns_under_the_default_recipe(name, size, tmp_path):
    """64 val images, so 0.65 is 42 right (a model that guesses gets there with probability 0.008).
    Measured on 32 val images: the slowest learners here, ShuffleNetV2 and MNASNet, reach 0.69 to
    0.78 depending on the run's random draws, MobileNetV3-Small 1.0. Before the BatchNorm statistics of the average were re-estimated, MobileNetV3-Small and
    ShuffleNetV2 validated here at 0.50 (every image one class) with train accuracy 0.94 and 0.75,
    as on the landmark target task."""
    history = _fit_colours(name, size, tmp_path)
    assert history[-1]["val_balanced_accuracy"] >= 0.65, history[-1]


def test_averaged_batchnorm_statistics_collapse_and_the_run_says_so(tmp_path):
    """--ema-bn-images 0 averages the statistics with the weights, as before: MobileNetV3-Small
    then gives every val image one class, and the closing lines warn."""
    history = _fit_colours("mobilenet_v3_small", 32, tmp_path, ema_bn_images=0)
    assert history[-1]["val_balanced_accuracy"] == 0.5 and history[-1]["train_accuracy"] > 0.9
    assert "warning: val balanced accuracy stayed at chance" in engine.run_report(tmp_path, history, TrainConfig())


def test_batchnorm_statistics_are_re_estimated_except_in_frozen_modules():
    torch.manual_seed(0)
    frozen, trained = torch.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    model = torch.nn.Sequential(frozen, torch.nn.Dropout(0.5), trained)
    batches = [torch.randn(4, 3, 2, 2) * 3 + 1 for _ in range(3)]
    assert reestimate_batchnorm(model, iter(batches), keep=[frozen]) == 12
    assert torch.equal(frozen.running_mean, torch.zeros(3)) and torch.equal(frozen.running_var, torch.ones(3))
    # The plain mean of each batch's statistics (frozen is in eval mode, the dropout is off).
    means = torch.stack([x.mean((0, 2, 3)) for x in batches]).mean(0)
    variances = torch.stack([x.var((0, 2, 3)) for x in batches]).mean(0)
    assert torch.allclose(trained.running_mean, means) and torch.allclose(trained.running_var, variances, rtol=1e-4)
    assert trained.momentum == 0.1 and not model.training
    assert reestimate_batchnorm(torch.nn.Linear(2, 2), iter(batches)) == 0, "no BatchNorm: no pass"


def test_re_estimation_is_counted_in_the_flops(tmp_path):
    train, val = colour_split(24, 16, 0), colour_split(8, 16, 1)
    describe = {"model": "fastnet", "stem": "standard", "task": None, "classes": ["red", "blue"], "image_size": 16,
                "mean": [0.35] * 3, "std": [0.25] * 3, "args": {}}
    tflop = {}
    for images in (0, 10):
        torch.manual_seed(0)
        history = fit(build_model("fastnet", 2, 16), train, val, describe=describe, out=tmp_path / str(images),
                      device=torch.device("cpu"), seed=0,
                      config=TrainConfig(epochs=2, min_steps=0, batch_size=8, eval_every=1, min_size=0,
                                         ema_bn_images=images))
        tflop[images] = history[-1]["total_tflop"]
    assert (tflop[10] - tflop[0]) * 1e12 == pytest.approx(2 * 10 * inference_flops(build_model("fastnet", 2, 16), 16))


def test_a_small_train_split_is_gone_over_several_times_an_epoch():
    assert passes_per_epoch(2000, 64, 20, 600) == 1, "the landmark source task: 32 batches x 20 epochs"
    assert passes_per_epoch(250, 64, 20, 600) == 8 and passes_per_epoch(250, 64, 20, 0) == 1
    split = colour_split(10, 8, 0)
    one, two = engine._epoch_batches(split, 0, 3, 4, passes=1), engine._epoch_batches(split, 0, 2, 4, passes=2)
    assert [len(b) for b in two] == [4, 4, 2] * 2
    # Each pass is a whole shuffled epoch of its own; one pass is the epoch as it always was.
    assert all(sorted(torch.cat(two[i:i + 3]).tolist()) == list(range(10)) for i in (0, 3))
    assert not torch.equal(torch.cat(two[:3]), torch.cat(two[3:]))
    assert torch.equal(torch.cat(one), torch.cat(engine._pass_batches(split, 0, 3, 4, "shuffle")))


def test_train_py_stretches_a_small_split_to_min_steps(demo_data, tmp_path):
    result = run_main("train.py", "--data", demo_data, "--task", "target", "--model", "cnn3", "--epochs", "2",
                      "--min-steps", "8", "--out", tmp_path / "run")
    stretched = "80 train images: each epoch goes over them 2 times, so 2 epochs make at least --min-steps 8"
    assert stretched in result.stdout
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [int(r["passes"]) for r in rows] == [2, 2]


def _row(epoch, train_accuracy, val=None, loss=None, passes=1):
    row = {"epoch": epoch, "train_accuracy": train_accuracy, "passes": passes, "val_loss": loss}
    if val is not None:
        row.update(val_accuracy=val, val_balanced_accuracy=val, val_auroc=0.5)
    return row


def test_closing_lines_warn_when_val_stays_at_chance_while_training_learns():
    collapsed = [_row(1, 0.6), _row(2, 0.8, 0.5, 0.69), _row(3, 0.9), _row(4, 0.93, 0.52, 0.69)]
    warning = selection.chance_warning(collapsed, 2)
    assert warning.startswith("warning: val balanced accuracy stayed at chance") and "0.930" in warning
    assert selection.chance_warning(collapsed, 8) is None, "0.52 is far above chance for 8 classes"
    assert selection.chance_warning(collapsed[:2] + [_row(3, 0.9), _row(4, 0.93, 0.7, 0.5)], 2) is None
    assert selection.chance_warning([_row(1, 0.55, 0.5, 0.69)], 2) is None, "training learnt nothing either"


def test_closing_lines_say_when_a_run_was_still_improving():
    config = TrainConfig()
    improving = [_row(2, 0.8, 0.70, 0.60), _row(4, 0.9, 0.80, 0.50)]
    assert selection.still_improving_note(improving, config).endswith("e.g. --epochs 8")
    stretched = [_row(2, 0.8, 0.70, 0.60, passes=8), _row(4, 0.9, 0.80, 0.50, passes=8)]
    assert selection.still_improving_note(stretched, config).endswith("e.g. --min-steps 1200")
    assert selection.still_improving_note([_row(2, 0.8, 0.80, 0.60), _row(4, 0.9, 0.75, 0.50)], config) is None
    assert selection.still_improving_note([_row(2, 0.8, 0.70, 0.40), _row(4, 0.9, 0.80, 0.50)], config) is None
