"""Seed ensembles: transfer.py --seeds and ensemble.py write one checkpoint whose probabilities are
the mean of its members', and evaluate.py, export.py and explain.py take it as one model."""
import copy
import csv
import json

import numpy as np
import pytest
import torch

from conftest import run_main
from lib import cam
from lib.checkpoint import FORMAT, build_from_checkpoint, load_checkpoint, save_checkpoint
from lib.data import load_split
from lib.edge import OnnxClassifier
from lib.ensemble import MUST_MATCH
from lib.evaluation import TorchPredictor
from lib.flops import inference_flops
from lib.models import Ensemble, build_model

CPU = torch.device("cpu")


def test_seeds_train_members_whose_mean_is_evaluated_exported_and_explained(source_run, demo_data, tmp_path):
    out = tmp_path / "target"
    trained = run_main("transfer.py", "--source", source_run / "best.pt", "--data", demo_data, "--task", "target",
                       "--seeds", "0", "1", "--epochs", "1", "--out", out)
    members = [out / f"seed-{seed}" / "model.pt" for seed in (0, 1)]
    for member in members:
        assert {"best.pt", "last.pt", "model.pt"} <= {p.name for p in member.parent.iterdir()}
    # One self-describing file, loaded with weights_only=True, holding every member's weights.
    ensemble = load_checkpoint(out / "model.pt")
    singles = [load_checkpoint(member) for member in members]
    assert [m["seed"] for m in ensemble["ensemble"]["members"]] == [0, 1]
    assert [m["selection"] for m in ensemble["ensemble"]["members"]] == [s["selection"] for s in singles]
    for key in ("model", "classes", "image_size", "mean", "std", "resize", "lineage"):
        assert ensemble[key] == singles[0][key], key
    assert ensemble["state_dict"].keys() == {f"members.{i}.{k}" for i in (0, 1) for k in singles[0]["state_dict"]}
    assert all(torch.equal(ensemble["state_dict"][f"members.{i}.{k}"], v)
               for i, single in enumerate(singles) for k, v in single["state_dict"].items())
    member_gflop = inference_flops(build_from_checkpoint(singles[0]), 64) / 1e9
    assert f"{2 * member_gflop:.3f} GFLOP per image (2 x {member_gflop:.3f})" in trained.stdout, trained.stdout

    # evaluate.py: the ensemble's probabilities are the mean of the members', each from its own checkpoint.
    run_main("evaluate.py", "--checkpoint", out / "model.pt", "--data", demo_data, "--split", "val",
             "--out", tmp_path / "eval")
    with open(tmp_path / "eval" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    evaluated = np.array([[float(row[f"prob_{c}"]) for c in ensemble["classes"]] for row in rows])
    images = load_split(demo_data, "val", "target").images
    mean = np.mean([TorchPredictor(member, CPU).predict(images) for member in members], axis=0)
    assert np.abs(evaluated - mean).max() < 1e-6
    assert np.abs(TorchPredictor(members[0], CPU).predict(images) - mean).max() > 1e-3, "members too alike to tell"

    # export.py: one ONNX graph that outputs the mean, its metadata naming the ensemble; int8 too.
    onnx_path = tmp_path / "model.onnx"
    exported = run_main("export.py", "--checkpoint", out / "model.pt", "--out", onnx_path, "--quantize", "int8")
    assert "exported ensemble of 2 cnn3 (seeds 0, 1)" in exported.stdout
    fp32 = OnnxClassifier(onnx_path)
    np.testing.assert_allclose(fp32.predict_proba(images.permute(0, 2, 3, 1).numpy()), mean, atol=1e-5)
    assert json.loads(fp32.metadata["ensemble"])["members"] == 2
    assert float(fp32.metadata["gflop_per_image"]) == pytest.approx(2 * member_gflop, abs=1e-4)
    assert json.loads(OnnxClassifier(onnx_path.with_suffix(".int8.onnx")).metadata["ensemble"])["seeds"] == [0, 1]

    # explain.py: Grad-CAM at every member's default layer, the sanity check re-initialising both.
    run_main("explain.py", "--checkpoint", out / "model.pt", "--data", demo_data, "--task", "target",
             "--num-images", "3", "--sanity", "--out", tmp_path / "cam")
    [explained] = json.loads((tmp_path / "cam" / "cam_stats.json").read_text())["models"]
    assert explained["layers"] == ["members.0.relu2", "members.1.relu2"]
    assert explained["model"] == "ensemble of 2 cnn3 (seeds 0, 1)" and explained["sanity"]["images"] == 3

    # ensemble.py from the members' checkpoints writes the same weights as transfer.py did.
    run_main("ensemble.py", *members, "--out", tmp_path / "again.pt")
    again = load_checkpoint(tmp_path / "again.pt")
    assert all(torch.equal(again["state_dict"][k], v) for k, v in ensemble["state_dict"].items())


def _gradcam_by_hand(model, x, layers, targets, pair=lambda grads: grads):
    """Grad-CAM of the class log-odds at each layer written out (activations weighted by their
    gradient's channel means, summed, rectified, scaled to [0, 1] at the input's size), averaged
    and scaled as pytorch-grad-cam does. pair: which gradient goes with which layer."""
    from pytorch_grad_cam.utils.image import scale_cam_image

    outputs = {}
    hooks = [model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: outputs.update({name: o}))
             for name in layers]
    logits = model(x)
    for hook in hooks:
        hook.remove()
    score = sum(cam.ClassLogOdds(int(t))(row) for t, row in zip(targets, logits))
    grads = pair(torch.autograd.grad(score, [outputs[name] for name in layers]))
    maps = [scale_cam_image(torch.relu((grad.mean(dim=(2, 3), keepdim=True) * outputs[name]).sum(1)).detach().numpy(),
                            (x.shape[-1], x.shape[-2])) for name, grad in zip(layers, grads)]
    return scale_cam_image(np.maximum(np.mean(maps, axis=0), 0))


def test_gradcam_pairs_each_members_activations_with_its_own_gradients():
    """pytorch-grad-cam pairs the i-th recorded activation with the i-th gradient, assuming backward
    reaches the layers in reverse forward order; over parallel members a mix-up would pair one
    member's activations with another's gradients."""
    torch.manual_seed(0)
    members = [build_model("fastnet", 2, 32) for _ in range(3)]
    model = Ensemble(members).eval()
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([0, 1, 0, 1])
    layers = cam.target_layers(model, "fastnet")
    assert layers == ["members.0.layer2", "members.1.layer2", "members.2.layer2"]
    maps = cam.compute_heatmaps(model, images, [0.5] * 3, [0.25] * 3, CPU, "gradcam", layers, targets)
    x = (images.float() / 255 - 0.5) / 0.25
    np.testing.assert_allclose(maps, _gradcam_by_hand(model, x, layers, targets), atol=1e-5)
    mixed_up = _gradcam_by_hand(model, x, layers, targets, pair=lambda grads: grads[::-1])
    assert np.abs(maps - mixed_up).max() > 0.1, "members too alike for a mix-up to show"
    # Sane: an ensemble of copies of one network has that network's maps.
    copies = Ensemble([members[0], copy.deepcopy(members[0])]).eval()
    np.testing.assert_allclose(
        cam.compute_heatmaps(copies, images, [0.5] * 3, [0.25] * 3, CPU, "gradcam", cam.target_layers(copies, "fastnet"),
                             targets),
        cam.compute_heatmaps(members[0], images, [0.5] * 3, [0.25] * 3, CPU, "gradcam", ["layer2"], targets), atol=1e-5)


def _checkpoint(path, model="cnn3", stem=None, image_size=64, classes=("a", "b"), resize="squash",
                mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), seed=0):
    torch.manual_seed(seed)
    network = build_model(model, len(classes), image_size, stem)
    save_checkpoint({"format": FORMAT, "model": model, "stem": stem, "classes": list(classes), "image_size": image_size,
                     "resize": resize, "mean": list(mean), "std": list(std), "args": {"seed": 0}, "epoch": 1,
                     "metrics": {}, "state_dict": network.state_dict()}, path)
    return path


def test_incompatible_members_and_ensembles_where_one_model_belongs_are_refused_in_one_line(tmp_path):
    first = _checkpoint(tmp_path / "first.pt")
    resnet = {"model": "resnet18", "image_size": 32}
    pairs = {"model": ({}, {"model": "fastnet"}), "stem": (resnet, {**resnet, "stem": "stock"}),
             "classes": ({}, {"classes": ("a", "c")}), "image size": ({}, {"image_size": 32}),
             "resize": ({}, {"resize": "crop"}), "mean": ({}, {"mean": (0.4, 0.5, 0.5)}),
             "std": ({}, {"std": (0.2, 0.25, 0.25)})}
    assert set(pairs) == {name for name, _ in MUST_MATCH}
    for name, (one, another) in pairs.items():
        other = _checkpoint(tmp_path / "other.pt", **another)
        refused = run_main("ensemble.py", _checkpoint(tmp_path / "one.pt", **one), other, "--out", tmp_path / "e.pt",
                           check=False)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
        expected = "the classes differ (in " if name == "classes" else f"its {name} is "
        assert refused.stderr.startswith(f"ensemble.py: error: member {other}: {expected}"), refused.stderr
    assert not (tmp_path / "e.pt").exists()
    run_main("ensemble.py", first, _checkpoint(tmp_path / "second.pt", seed=1), "--out", tmp_path / "e.pt")
    refused = {
        "is itself an ensemble": run_main("ensemble.py", first, tmp_path / "e.pt", "--out", tmp_path / "f.pt", check=False),
        "two or more checkpoints": run_main("ensemble.py", first, "--out", tmp_path / "f.pt", check=False),
        "an ensemble checkpoint; transfer from one model": run_main(
            "transfer.py", "--source", tmp_path / "e.pt", "--data", "demo", "--task", "target", "--out", tmp_path / "t",
            check=False),
        "two or more different seeds": run_main(
            "transfer.py", "--source", first, "--data", "demo", "--task", "target", "--seeds", "3", "3",
            "--out", tmp_path / "t", check=False)}
    for message, result in refused.items():
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_the_same_member_twice_is_refused_in_one_line(tmp_path):
    """`ensemble.py a.pt a.pt` (a link to it, a copy, or another file of the same weights, as a
    run's model.pt and best.pt) is one model dressed as two."""
    first = _checkpoint(tmp_path / "first.pt")
    copy_of_first, link, renamed = tmp_path / "copy.pt", tmp_path / "link.pt", tmp_path / "model.pt"
    copy_of_first.write_bytes(first.read_bytes())
    link.symlink_to(first)
    save_checkpoint({**load_checkpoint(first), "selection": "best by accuracy"}, renamed)
    for twin in (first, link, copy_of_first, renamed):
        refused = run_main("ensemble.py", first, _checkpoint(tmp_path / "second.pt", seed=1), twin,
                           "--out", tmp_path / "e.pt", check=False)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
        assert f"member {twin}: has the same weights as {first}" in refused.stderr, refused.stderr
    assert not (tmp_path / "e.pt").exists()
