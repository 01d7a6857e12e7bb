"""MixUp and CutMix (lib.mixing: seeded per step, the global generator left alone) and the loss
(lib.loss: one scale for hard and mixed targets, class weights, label smoothing once); a run
with mixing and balancing resumes exactly, and --resume refuses a change of these flags."""
import pytest
import torch
import torch.nn.functional as F

from conftest import run_main
from lib import mixing
from lib.checkpoint import load_checkpoint, resume_mismatches
from lib.data import Split
from lib.engine import fit
from lib.loss import cross_entropy
from lib.models import build_model
from lib.recipe import TrainConfig


def test_loss_has_one_scale_for_hard_and_mixed_targets():
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 0, 1])
    weights = torch.tensor([0.5, 2.0, 3.0])
    one_hot = F.one_hot(labels, 3).float()
    for smoothing in (0.0, 0.1):
        # One-hot rows give exactly PyTorch's integer-target loss, weighted or not ...
        assert cross_entropy(logits, one_hot, weights, smoothing) == pytest.approx(
            F.cross_entropy(logits, labels, weight=weights, label_smoothing=smoothing).item(), rel=1e-6)
        assert cross_entropy(logits, one_hot, None, smoothing) == pytest.approx(
            F.cross_entropy(logits, labels, label_smoothing=smoothing).item(), rel=1e-6)
    # ... where PyTorch's own soft-target path is on another scale (pytorch #107680).
    assert F.cross_entropy(logits, one_hot, weight=weights).item() > 1.3 * cross_entropy(logits, one_hot, weights)
    # A mixture lam of class a and 1 - lam of class b: the weighted mean of the two losses.
    lam, log_p = 0.3, F.log_softmax(logits[:1], dim=1)[0]
    mixed = torch.tensor([[lam, 1 - lam, 0.0]])
    expected = -(lam * 0.5 * log_p[0] + (1 - lam) * 2.0 * log_p[1]) / (lam * 0.5 + (1 - lam) * 2.0)
    assert cross_entropy(logits[:1], mixed, weights) == pytest.approx(expected.item(), rel=1e-6)
    # Label smoothing is applied once, to the mixture.
    assert cross_entropy(logits[:1], mixed, None, 0.1) == pytest.approx(
        F.cross_entropy(logits[:1], mixed * 0.9 + 0.1 / 3).item(), rel=1e-6)


def test_mixing_is_a_function_of_its_seed_and_leaves_global_randomness_alone():
    mixer = mixing.make_mixer(0.2, 1.0, num_classes=3)
    images, labels = torch.rand(8, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = [mixing.mix(mixer, images, labels, mixing.step_seed(0, 1, step, 0)) for step in range(6)]
    assert torch.equal(torch.get_rng_state(), before), "the global generator moved"
    again = [mixing.mix(mixer, images, labels, mixing.step_seed(0, 1, step, 0)) for step in range(6)]
    for (x, t), (x2, t2) in zip(first, again):
        assert torch.equal(x, x2) and torch.equal(t, t2)
        assert t.shape == (8, 3) and torch.allclose(t.sum(1), torch.ones(8))
    # Soft targets, different mixtures per step, and both MixUp and CutMix were chosen: CutMix
    # pastes pixels unchanged, MixUp blends them (at most a box of each image stays as it was).
    assert all(not torch.equal(t, F.one_hot(labels, 3).float()) for _, t in first)
    assert all(not torch.equal(first[i][0], first[j][0]) for i in range(6) for j in range(i))
    unchanged = [(x == images).float().mean().item() for x, _ in first]
    assert min(unchanged) < 0.01 < max(unchanged)
    assert mixing.make_mixer(0, 0, 3) is None


def _split(n_frequent=12, n_rare=4, size=32):
    generator = torch.Generator().manual_seed(0)
    n = n_frequent + n_rare
    return Split(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator),
                 torch.tensor([0] * n_frequent + [1] * n_rare), ["frequent", "rare"], [str(i) for i in range(n)])


DESCRIBE = {"model": "cnn3", "task": None, "classes": ["frequent", "rare"], "image_size": 32, "mean": [0.5] * 3,
            "std": [0.25] * 3, "args": {"data": "tiny"}}


MIXED = TrainConfig(epochs=2, min_steps=0, batch_size=4, augment="light", min_size=0, eval_every=1, mixup=0.4,
                    cutmix=1.0, class_weights="balanced", sampler="balanced")


def _fit(out, config, resume=False, monitor=None):
    torch.manual_seed(0)
    fit(build_model("cnn3", 2, 32), _split(), _split(), describe=DESCRIBE, config=config, out=out,
        device=torch.device("cpu"), seed=0, resume=resume, monitor=monitor)
    return load_checkpoint(out / "last.pt")


def test_an_interrupted_run_with_mixing_and_balancing_resumes_exactly(tmp_path):
    uninterrupted = _fit(tmp_path / "a", MIXED)

    def interrupt(epoch, model):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path / "b", MIXED, monitor=interrupt)
    assert load_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 1
    resumed = _fit(tmp_path / "b", MIXED, resume=True)
    for name, tensor in uninterrupted["training"]["raw_state_dict"].items():
        assert torch.equal(tensor, resumed["training"]["raw_state_dict"][name]), name
    assert [r["train_loss"] for r in resumed["history"]] == [r["train_loss"] for r in uninterrupted["history"]]
    # Not vacuous: without mixing the same run ends elsewhere.
    plain = _fit(tmp_path / "c", TrainConfig(**{**MIXED.__dict__, "mixup": 0.0, "cutmix": 0.0}))
    assert not torch.equal(plain["training"]["raw_state_dict"]["conv1.weight"],
                           uninterrupted["training"]["raw_state_dict"]["conv1.weight"])


def test_resume_refuses_a_change_of_the_new_flags(demo_data, tmp_path):
    run = {"args": {"mixup": 0.2, "cutmix": 0.0, "class_weights": "balanced", "sampler": "shuffle"}, "classes": []}
    for flag, key, value in (("--mixup", "mixup", 0.0), ("--cutmix", "cutmix", 1.0),
                             ("--class-weights", "class_weights", "none"), ("--sampler", "sampler", "balanced")):
        changed = {**run, "args": {**run["args"], key: value}}
        assert resume_mismatches(run, changed) == [flag]
    # A run from before the flags existed trained as their defaults.
    defaults = {"args": {"mixup": 0.0, "cutmix": 0.0, "class_weights": "none", "sampler": "shuffle"}, "classes": []}
    assert resume_mismatches({"args": {}, "classes": []}, defaults) == []
    out = tmp_path / "run"
    common = ["--data", demo_data, "--task", "target", "--model", "cnn3", "--epochs", "1", "--out", out]
    run_main("train.py", *common, "--mixup", "0.2")
    result = run_main("train.py", *common, "--mixup", "0.3", "--resume", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f"train.py: error: --resume: {out / 'last.pt'} belongs to a run with different --mixup (it had --mixup 0.2); "
        "resume with the same settings, or start a new --out")
