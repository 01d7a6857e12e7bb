"""The weight average (lib.recipe.make_ema, --ema): bias-corrected, decays that differ give different
weights, and best.pt holds the average of its epoch."""

import pytest
import torch

from lib import engine
from lib.checkpoint import load_checkpoint
from lib.data import Split
from lib.engine import fit
from lib.models import build_model
from lib.recipe import TrainConfig, ema_weight, make_ema


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
