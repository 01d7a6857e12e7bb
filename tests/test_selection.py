"""Which epoch a run recommends and when it stops (lib.selection): early stopping counts epochs and
waits for the learning rate to fall, --patience none, and the log's notes on a val split too
small to rank epochs or unbalanced."""
import numpy as np
import pytest
import torch

from conftest import run_main
from lib import engine
from lib.checkpoint import load_checkpoint
from lib.engine import fit
from lib.models import build_model
from lib.recipe import TrainConfig, config_from_args
from lib.selection import balance_note, paired_difference, ranking_note
from test_train import _describe, _tiny_split


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
