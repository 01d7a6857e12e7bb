"""int8 (lib.quantize, lib.int8_gate, export.py --quantize int8): the gate passes a model that moves
borderline images across p = 0.5 and refuses a broken one after trying every recipe in order (the
fp32 model kept, exit 3), is never scored on the calibration split, and its statistics equal
their references; each target CPU gets the types onnxruntime recommends. The int8 model's outputs
against PyTorch's: test_onnx_parity.py."""
import csv
import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from conftest import run_main
from lib.checkpoint import file_hash
from lib.data import load_split
from lib.edge import OnnxClassifier, read_metadata
from test_export import _one_line_error


@pytest.fixture(scope="module")
def confident_cnn3(demo_data, tmp_path_factory):
    """A cnn3 that tells the demo target classes apart with confident probabilities (val
    accuracy 1.0 here): the gate's tests need images the float model is sure of. No augmentation
    or label smoothing, batches of 16: 40 steps that fit the 80 images."""
    run = tmp_path_factory.mktemp("confident")
    run_main("train.py", "--data", demo_data, "--task", "target", "--model", "cnn3", "--epochs", "8",
             "--batch-size", "16", "--augment", "none", "--label-smoothing", "0", "--warmup-epochs", "0",
             "--ema", "0", "--out", run)
    return run


def _borderline_blends(fp32, int8, class0, class1, wanted=2, margin=0.002):
    """Blends (1 - a) * x + a * y of a class-0 and a class-1 image (one per pair; label: the
    larger part) that the fp32 model scores just off p = 0.5 and the int8 model puts on the other
    side, each by more than `margin`, so that float rounding elsewhere cannot move them back.
    A coarse grid of a finds where the fp32 model crosses 0.5, a fine one searches around it."""
    def blend(x, y, alphas):
        weight = alphas[:, None, None, None]
        return np.rint(weight * y + (1 - weight) * x).astype(np.uint8)

    found = []
    for x, y in zip(class0, class1):
        coarse = np.linspace(0, 1, 21)
        above = np.flatnonzero(fp32.predict_proba(blend(x, y, coarse))[:, 1] > 0.5)
        if len(above) == 0 or above[0] == 0:
            continue
        alphas = np.linspace(coarse[above[0] - 1], coarse[above[0]], 201)
        blends = blend(x, y, alphas)
        p32, p8 = fp32.predict_proba(blends)[:, 1], int8.predict_proba(blends)[:, 1]
        flips = np.flatnonzero(((p32 > 0.5) != (p8 > 0.5)) & (np.abs(p32 - 0.5) > margin) & (np.abs(p8 - 0.5) > margin))
        if len(flips):
            found.append((blends[flips[0]], int(alphas[flips[0]] >= 0.5)))
        if len(found) == wanted:
            break
    return found


def test_int8_that_flips_a_few_borderline_images_passes_the_gate(confident_cnn3, demo_data, tmp_path):
    """The issue's case: int8 moves two images that sit at p = 0.5 across it, which a top-1
    agreement bound of 0.99 refused (60 of 62). Nothing confident changes and the accuracy loss
    is two images one way (McNemar p 0.5): noise, so the gate passes the model."""
    first = tmp_path / "demo" / "model.onnx"
    run_main("export.py", "--checkpoint", confident_cnn3 / "best.pt", "--out", first, "--quantize", "int8")
    val = load_split(demo_data, "val", "target")
    pixels, labels = val.images.permute(0, 2, 3, 1).numpy(), val.labels.numpy()
    blends = _borderline_blends(OnnxClassifier(first), OnnxClassifier(first.with_suffix(".int8.onnx")),
                                pixels[labels == 0], pixels[labels == 1])
    assert len(blends) == 2, "no blend that int8 moves across p = 0.5 by more than the margin"
    # The demo's target rows with the same train images (so calibration gives the same int8
    # model) and the blends added to val.
    data = tmp_path / "borderline"
    (data / "images").mkdir(parents=True)
    with open(demo_data / "landmarks.csv", newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, [r for r in reader if r["task"] == "target" and r["partition"] in ("train", "val")]
    names = {int(r["numeric_label"]): r["semantic_label"] for r in rows}
    for row in rows:
        shutil.copy(demo_data / "images" / row["filename"], data / "images")
    for i, (image, label) in enumerate(blends):
        Image.fromarray(image).save(data / "images" / f"blend{i}.png")
        rows.append({"filename": f"blend{i}.png", "partition": "val", "task": "target",
                     "semantic_label": names[label], "numeric_label": str(label)})
    with open(data / "landmarks.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "borderline.onnx"
    result = run_main("export.py", "--checkpoint", confident_cnn3 / "best.pt", "--verify-data", data,
                      "--out", out, "--quantize", "int8")
    metadata = OnnxClassifier(out.with_suffix(".int8.onnx")).metadata
    verdict = json.loads(metadata["int8_gate"])
    assert verdict["images"] == 62 and verdict["agreement"] == pytest.approx(60 / 62), result.stdout
    assert verdict["confident_images"] > 30 and verdict["confident_agreement"] == 1.0
    assert verdict["only_fp32_right"] + verdict["only_int8_right"] == 2 and verdict["mcnemar_p"] >= 0.5
    assert verdict["passed"] and json.loads(metadata["quantization"])["attempt"] == 1
    assert "0.9677 on all 62" in result.stdout and "int8 gate passed: kept attempt 1" in result.stdout


def _black_calibration(monkeypatch):
    """Calibrate on black images, as a broken preprocessing step would: ranges that fit nothing real."""
    import lib.export_set
    real_calibration_images = lib.export_set.calibration_images

    def black_images(*args, **kwargs):
        images, source = real_calibration_images(*args, **kwargs)
        return torch.zeros_like(images), source
    monkeypatch.setattr(lib.export_set, "calibration_images", black_images)


def test_refused_recipes_fall_back_in_order_and_the_kept_one_is_recorded(confident_cnn3, tmp_path, monkeypatch):
    """Black calibration ruins the first convolution's quantized input: minmax and percentile
    calibration flip a confident image; the third recipe keeps that layer in float and passes."""
    _black_calibration(monkeypatch)
    out = tmp_path / "model.onnx"
    result = run_main("export.py", "--checkpoint", confident_cnn3 / "best.pt", "--out", out, "--quantize", "int8")
    attempts = [line.split("), ")[1].split(";")[0] for line in result.stdout.splitlines()
                if line.startswith("int8 attempt")]
    assert attempts == ["minmax calibration", "percentile calibration",
                        "minmax calibration, first convolution and classifier in float"], result.stdout
    assert result.stdout.count("int8 gate refused it: agreement") == 2 and "kept attempt 3" in result.stdout
    recipe = json.loads(OnnxClassifier(out.with_suffix(".int8.onnx")).metadata["quantization"])
    assert (recipe["calibration"], recipe["float_layers"], recipe["attempt"]) == (
        "minmax", "first convolution, classifier", 3)
    assert [r["recipe"]["calibration"] for r in recipe["refused_before"]] == ["minmax", "percentile"]
    assert all("(--min-confident-agreement)" in r["failures"][0] for r in recipe["refused_before"])


def test_int8_refused_by_every_recipe_keeps_the_fp32_model_and_exits_3(confident_cnn3, tmp_path, monkeypatch):
    """A corrupted int8 model (every quantized layer's weights negated through their scales)
    fails all four recipes, tried in the documented order: the verified fp32 model is written,
    an earlier int8 file is removed, and the exit code is 3."""
    import lib.quantize
    from onnx import numpy_helper
    real_quantize = lib.quantize.quantize_int8

    def corrupted(fp32_path, out, pixels, recipe, metadata=None):
        real_quantize(fp32_path, out, pixels, recipe, metadata)
        model = onnx.load(str(out))
        constants = {i.name: i for i in model.graph.initializer}
        for node in model.graph.node:
            weights = constants.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
            if weights is not None and len(weights.dims) > 1:
                scale = constants[node.input[1]]
                scale.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(scale), scale.name))
        onnx.save(model, str(out))
    monkeypatch.setattr(lib.quantize, "quantize_int8", corrupted)
    out = tmp_path / "model.onnx"
    out.with_suffix(".int8.onnx").write_bytes(b"an earlier run's model")
    result = run_main("export.py", "--checkpoint", confident_cnn3 / "best.pt", "--out", out, "--quantize", "int8",
                      "--overwrite", check=False)
    assert result.returncode == 3, result.stderr
    attempts = [line.split("), ")[1].split(";")[0] for line in result.stdout.splitlines()
                if line.startswith("int8 attempt")]
    assert attempts == ["minmax calibration", "percentile calibration",
                        "minmax calibration, first convolution and classifier in float", "entropy calibration"]
    assert result.stdout.count("int8 gate refused it") == 4, result.stdout
    assert result.stderr.strip() == (
        f"export.py: warning: the int8 gate refused all 4 recipes for --target x86: no int8 model (the earlier "
        f"one at {out.with_suffix('.int8.onnx')} is removed); the verified fp32 model is written: {out}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    assert OnnxClassifier(out).metadata["source_checkpoint_sha256"] == file_hash(confident_cnn3 / "best.pt")


def test_the_gate_is_never_scored_on_the_calibration_split(tmp_path):
    # Refused before anything is read: the checkpoint named need not even exist.
    result = run_main("export.py", "--checkpoint", tmp_path / "never_read.pt", "--out", tmp_path / "model.onnx",
                      "--quantize", "int8", "--verify-split", "train", check=False)
    _one_line_error(result, "--verify-split train: --quantize calibrates on the train split")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("target, method", [("x86-vnni", "minmax"), ("arm64", "percentile")])
def test_each_target_gets_the_types_onnxruntime_recommends(cnn3_export, demo_data, tmp_path, target, method):
    """x86 (the fixture): uint8 activations, 7-bit weights; x86-vnni: full 8-bit weights; arm64: int8 activations."""
    from onnx import numpy_helper
    from lib.quantize import TARGETS, Recipe, fused_convolutions, quantize_int8

    def weights_and_activation_types(path):
        model = onnx.load(str(path))
        constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        conv_weights = [constants[n.input[0]] for n in model.graph.node
                        if n.op_type == "DequantizeLinear" and constants.get(n.input[0], np.empty(0)).ndim == 4]
        zero_points = {constants[n.input[2]].dtype for n in model.graph.node
                       if n.op_type == "QuantizeLinear" and n.input[0] not in constants}
        return max(int(np.abs(w.astype(np.int32)).max()) for w in conv_weights), zero_points

    fp32 = cnn3_export[0]
    largest_weight, activation_types = weights_and_activation_types(fp32.with_suffix(".int8.onnx"))
    assert largest_weight <= 64 and activation_types == {np.dtype(np.uint8)}, "x86: 7-bit weights"
    pixels = load_split(demo_data, "train", "target").images.permute(0, 2, 3, 1).contiguous().numpy()
    out = tmp_path / f"{target}.onnx"
    quantize_int8(fp32, out, pixels, Recipe(target, method))
    largest_weight, activation_types = weights_and_activation_types(out)
    assert largest_weight == 127, "full-range weights use the whole int8 range"
    assert activation_types == {np.dtype(TARGETS[target].activations)}
    assert fused_convolutions(out, TARGETS[target].runtime_config) == (3, 3)
    assert onnx.load(str(out)).ir_version == 8 and read_metadata(out)["min_onnxruntime"] == "1.14"


def test_the_gate_statistics_equal_their_references():
    """The vectorised bootstrap AUROC is scikit-learn's weighted AUROC (ties included), the
    paired difference at full weight is the difference of auroc(), and McNemar's exact p is the
    binomial test's (6 of 6 discordant one way: 2 * 0.5**6)."""
    from sklearn.metrics import roc_auc_score
    from lib.metrics import auroc, mcnemar_exact, paired_auroc_difference, weighted_auroc

    rng = np.random.default_rng(0)
    labels, scores = rng.integers(0, 2, 50), np.round(rng.random(50), 1)  # rounded: many ties
    weights = rng.multinomial(50, np.full(50, 1 / 50), size=4)
    np.testing.assert_allclose(weighted_auroc(labels == 1, scores, weights),
                               [roc_auc_score(labels, scores, sample_weight=w) for w in weights], rtol=1e-12)
    labels, probs = rng.integers(0, 4, 80), rng.dirichlet(np.ones(4), 80)
    other = probs + rng.normal(0, 0.05, probs.shape).clip(-probs, None)
    change = paired_auroc_difference(labels, probs, other, n_resamples=200)
    assert change["difference"] == pytest.approx(auroc(labels, probs) - auroc(labels, other))
    assert change["interval"][0] < change["difference"] < change["interval"][1]
    assert (mcnemar_exact(6, 0), mcnemar_exact(2, 0), mcnemar_exact(0, 0)) == (pytest.approx(2 * 0.5 ** 6), 0.5, 1.0)


def test_the_gate_passes_borderline_flips_and_refuses_real_losses():
    """The issue's numbers: 140 images, two near p = 0.5 change side (raw agreement 0.9857);
    the same model with six confident images wrong is refused on each count."""
    from lib.int8_gate import Gate

    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 70)
    p1 = np.where(labels == 1, rng.uniform(0.85, 1, 140), rng.uniform(0, 0.15, 140))
    p1[[0, 70]] = [0.49, 0.51]  # one image of each class, just on its side of 0.5
    float_probs = np.stack([1 - p1, p1], 1)
    int8 = p1 + rng.uniform(-0.01, 0.01, 140)
    int8[[0, 70]] = [0.51, 0.49]
    verdict = Gate().judge(float_probs, np.stack([1 - int8, int8], 1), labels)
    assert verdict["agreement"] == pytest.approx(138 / 140) and verdict["confident_agreement"] == 1.0
    assert verdict["passed"], verdict["failures"]
    int8[71:77] = 0.05  # six confident class-1 images now called class 0, below most of class 0
    verdict = Gate().judge(float_probs, np.stack([1 - int8, int8], 1), labels)
    assert [f.split("(--")[1].split(")")[0] for f in verdict["failures"]] == [
        "min-confident-agreement", "max-accuracy-loss", "max-auroc-loss"], verdict["failures"]
    unlabelled = Gate().judge(float_probs, np.stack([1 - int8, int8], 1))
    assert unlabelled["failures"] == [verdict["failures"][0]] and "accuracy_loss" not in unlabelled
