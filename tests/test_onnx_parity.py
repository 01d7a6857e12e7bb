"""Exported models against PyTorch where the export tests do not look: raw logits before any
softmax, the int8 model's outputs, evaluate.py on .onnx files, and predict.py on images of
another size or mode and with --top-k above the number of classes."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_main, run_script
from lib.checkpoint import build_from_checkpoint, load_checkpoint
from lib.data import load_split
from lib.edge import OnnxClassifier
from lib.images import decode_image
from lib.inference import normalize, predict_probs

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def exported(target_run, tmp_path_factory):
    """target_run's best.pt as fp32 and int8 models that output raw logits."""
    out = tmp_path_factory.mktemp("review_onnx") / "model.onnx"
    run_main("export.py", "--checkpoint", target_run / "best.pt", "--out", out, "--quantize", "int8", "--raw-logits")
    return out, out.with_suffix(".int8.onnx")


@pytest.fixture(scope="module")
def reference(target_run, demo_data):
    """PyTorch's logits and probabilities for the val split, and the split."""
    checkpoint = load_checkpoint(target_run / "best.pt")
    model = build_from_checkpoint(checkpoint)
    val = load_split(demo_data, "val", "target", checkpoint["image_size"])
    with torch.no_grad():
        logits = model(normalize(val.images.float() / 255, checkpoint["mean"], checkpoint["std"]))
    probs = predict_probs(model, val.images, checkpoint["mean"], checkpoint["std"], CPU)
    return checkpoint, model, val, logits.numpy(), probs.numpy()


def test_raw_logits_equal_pytorch_logits_before_softmax(exported, reference):
    # Softmax hides a constant added to every logit; the bare outputs must match themselves.
    _, _, val, logits, _ = reference
    classifier = OnnxClassifier(exported[0])
    assert classifier.returns_logits
    raw = classifier.session.run(None, {classifier.input_name: val.images.permute(0, 2, 3, 1).numpy()})[0]
    np.testing.assert_allclose(raw, logits, atol=1e-4, rtol=0)


def test_int8_model_agrees_with_pytorch(exported, reference):
    _, _, val, logits, probs = reference
    classifier = OnnxClassifier(exported[1])
    pixels = val.images.permute(0, 2, 3, 1).numpy()
    raw = classifier.session.run(None, {classifier.input_name: pixels})[0]
    int8_probs = classifier.predict_proba(pixels)
    # Quantization moves the numbers a little, not the decisions; a broken int8 graph (wrong
    # scales, lost normalisation) moves both by far more.
    # (Measured on this CPU: logits within 0.4% of their range, probabilities within 0.001.)
    assert np.abs(raw - logits).max() < 0.1 * np.abs(logits).max(), (raw[:3], logits[:3])
    assert np.abs(int8_probs - probs).max() < 0.05
    assert (int8_probs.argmax(1) == probs.argmax(1)).mean() >= 0.9


def test_evaluate_on_exported_models_matches_the_checkpoint(exported, target_run, demo_data, tmp_path):
    import evaluate

    def metrics(model_file, name):
        evaluate.main(evaluate.get_args_parser().parse_args(
            ["--checkpoint", str(model_file), "--data", str(demo_data), "--task", "target", "--split", "val",
             "--out", str(tmp_path / name)]))
        return json.loads((tmp_path / name / "metrics.json").read_text())

    checkpoint, fp32, int8 = (metrics(target_run / "best.pt", "pt"), metrics(exported[0], "fp32"),
                              metrics(exported[1], "int8"))
    assert fp32["n_images"] == int8["n_images"] == checkpoint["n_images"] == 60
    assert fp32["accuracy"] == checkpoint["accuracy"]
    assert fp32["auroc"] == pytest.approx(checkpoint["auroc"], abs=1e-6)
    assert fp32["loss"] == pytest.approx(checkpoint["loss"], abs=1e-5)
    assert abs(int8["accuracy"] - checkpoint["accuracy"]) <= 0.05
    assert abs(int8["auroc"] - checkpoint["auroc"]) <= 0.05


def test_predict_on_other_sizes_and_modes_and_top_k_above_the_classes(exported, reference, demo_data, tmp_path):
    checkpoint, model, val, _, _ = reference
    source = Image.open(demo_data / "images" / val.filenames[0])
    files = {"gray_100x80.png": source.convert("L").resize((100, 80)),
             "rgba_48.png": source.convert("RGBA").resize((48, 48)),
             "palette_64.gif": source.convert("P"),
             "rgb_90.jpg": source.resize((90, 90))}
    for name, image in files.items():
        image.save(tmp_path / name)
    paths = [tmp_path / name for name in files]
    result = run_script("predict.py", exported[0], *paths, "--json", "--top-k", "5")
    predictions = json.loads(result.stdout)
    # What training does to the same files: decode (any mode to RGB, any size to 64 px), then PyTorch.
    decoded = torch.from_numpy(np.stack([decode_image(p, checkpoint["image_size"]) for p in paths]))
    assert all(torch.equal(decoded[0][..., c], decoded[0][..., 0]) for c in (1, 2)), "grayscale: equal channels"
    expected = predict_probs(model, decoded.permute(0, 3, 1, 2), checkpoint["mean"], checkpoint["std"], CPU).numpy()
    assert [p["file"] for p in predictions] == [str(p) for p in paths]
    for row, want in zip(predictions, expected):
        top = row["predictions"]
        assert len(top) == 2, "--top-k 5 of 2 classes lists each class once"
        assert sorted(p["label"] for p in top) == sorted(checkpoint["classes"])
        assert top[0]["probability"] >= top[1]["probability"]
        got = {p["label"]: p["probability"] for p in top}
        np.testing.assert_allclose([got[c] for c in checkpoint["classes"]], want, atol=1e-4)
