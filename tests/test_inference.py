"""lib.inference: the one uint8 -> network-input step and batched prediction, and who may import what."""
import re
import subprocess
import sys

import numpy as np
import onnxruntime
import torch
import torch.nn.functional as F

from conftest import REPO
from lib.augment import augment_batch
from lib.checkpoint import FORMAT, save_checkpoint
from lib.inference import normalize, predict_probs, scale_pixels, to_input
from lib.models import build_model
from lib.onnx_export import PixelClassifier, export_onnx

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.1)
CPU = torch.device("cpu")


def _pixels(n=5, size=6, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_the_input_step_scales_then_normalises_each_channel():
    pixels = _pixels()
    expected = (pixels.double() / 255 - torch.tensor(MEAN).double().view(1, 3, 1, 1)) / \
        torch.tensor(STD).double().view(1, 3, 1, 1)
    x = to_input(pixels, MEAN, STD)
    assert x.dtype == torch.float32 and pixels.dtype == torch.uint8
    torch.testing.assert_close(x.double(), expected, rtol=0, atol=1e-5)
    # Training's path (augmentation on [0, 1] images, then normalize) meets the same numbers.
    assert torch.equal(normalize(augment_batch(pixels, "none", torch.Generator()), MEAN, STD), x)
    assert torch.equal(normalize(scale_pixels(pixels), torch.tensor(MEAN).view(1, 3, 1, 1), STD), x)


def test_predict_probs_feeds_the_network_the_input_step_in_batches_and_mirrors_for_tta():
    pixels = _pixels(7)
    flatten = torch.nn.Flatten()  # the network's output is its input: what predict_probs fed it
    expected = F.softmax(to_input(pixels, MEAN, STD).flatten(1), dim=1)
    assert torch.equal(predict_probs(flatten, pixels, MEAN, STD, CPU, batch_size=3), expected)
    mirrored = F.softmax(to_input(pixels.flip(3), MEAN, STD).flatten(1), dim=1)
    torch.testing.assert_close(predict_probs(flatten, pixels, MEAN, STD, CPU, tta=True), (expected + mirrored) / 2)
    assert predict_probs(flatten, pixels[:0], MEAN, STD, CPU).numel() == 0


def test_the_exported_graph_does_the_same_input_step(tmp_path):
    """PixelClassifier takes NHWC pixels and runs to_input inside the graph: PyTorch's wrapper
    equals to_input exactly, and onnxruntime's graph matches it to float rounding."""
    pixels = _pixels(4, 8)
    wrapper = PixelClassifier(torch.nn.Flatten(), MEAN, STD, raw_logits=True).eval()
    nhwc = pixels.permute(0, 2, 3, 1).contiguous()
    assert torch.equal(wrapper(nhwc), to_input(pixels, MEAN, STD).flatten(1))
    torch.manual_seed(0)
    network = build_model("cnn3", 2, 16).eval()
    checkpoint = {"format": FORMAT, "model": "cnn3", "classes": ["a", "b"], "image_size": 16, "mean": list(MEAN),
                  "std": list(STD), "state_dict": network.state_dict()}
    export_onnx(network, checkpoint, {}, tmp_path / "m.onnx", raw_logits=True)
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    nhwc = _pixels(4, 16, seed=1).permute(0, 2, 3, 1).contiguous()
    with torch.no_grad():
        expected = network(to_input(nhwc.permute(0, 3, 1, 2), MEAN, STD)).numpy()
    np.testing.assert_allclose(session.run(None, {"pixels": nhwc.numpy()})[0], expected, rtol=0, atol=1e-5)


def test_evaluation_explanation_and_export_do_not_import_the_training_loop(tmp_path):
    """They predict through lib.inference; the training loop (lib.engine, with DDP and tqdm's bars)
    and torchrun's helpers (lib.distributed) stay out, even once a checkpoint has predicted."""
    torch.manual_seed(0)
    save_checkpoint({"format": FORMAT, "model": "cnn3", "classes": ["a", "b"], "image_size": 16, "mean": list(MEAN),
                     "std": list(STD), "state_dict": build_model("cnn3", 2, 16).state_dict()}, tmp_path / "m.pt")
    code = ("import sys, torch, lib.evaluation, lib.cam, lib.onnx_export\n"
            f"predictor = lib.evaluation.load_predictor({str(tmp_path / 'm.pt')!r}, torch.device('cpu'))\n"
            "print(predictor.predict(torch.zeros(2, 3, 16, 16, dtype=torch.uint8)).shape)\n"
            "print(' '.join(m for m in ('lib.engine', 'lib.distributed') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["(2, 2)", ""]


def test_the_normalisation_arithmetic_has_one_home():
    """Scaling by 255 and (x - mean) / std are written in lib/inference.py only; everything else calls it."""
    sources = {path.relative_to(REPO).as_posix(): path.read_text() for path in
               [*REPO.glob("*.py"), *(REPO / "lib").glob("*.py"), *(REPO / "bench").glob("*.py")]}
    written = {name for name, text in sources.items()
               if re.search(r"div_?\(255\)|/ ?255\b|- ?(self\.)?mean\) ?/ ?(self\.)?std", text)}
    assert written == {"lib/inference.py"}, written
