"""export.py and predict.py: verified ONNX export, int8, metadata, and inference without torch."""
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from conftest import run_script
from lib.checkpoint import file_hash, load_checkpoint, model_from_checkpoint, save_checkpoint
from lib.data import load_split
from lib.edge import OnnxClassifier
from lib.engine import predict_probs
from lib.errors import UserError


@pytest.fixture(scope="module")
def cnn3_export(target_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("cnn3_onnx") / "model.onnx"
    result = run_script("export.py", "--checkpoint", target_run / "best.pt", "--out", out, "--quantize", "int8")
    return out, result.stdout


@pytest.fixture(scope="module")
def resnet18_export(demo_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("resnet18")
    # Small batches: enough steps for BatchNorm's running statistics to leave their initial values.
    run_script("train.py", "--data", demo_data, "--task", "target", "--model", "resnet18", "--epochs", "1",
               "--batch-size", "16", "--lr", "1e-3", "--out", run)
    result = run_script("export.py", "--checkpoint", run / "best.pt", "--out", run / "model.onnx", "--raw-logits")
    return run, result.stdout


def _val_rows(stdout):
    return {line.split()[1] + line.split()[2]: float(line.split()[3])
            for line in stdout.splitlines() if line.startswith("fp32 batch")}


def test_cnn3_export_is_verified_self_contained_and_quantized(cnn3_export):
    out, stdout = cnn3_export
    rows = _val_rows(stdout)
    assert set(rows) == {"batch1", "batch64"}, stdout
    assert all(diff <= 1e-4 for diff in rows.values()), stdout
    assert "60 images of" in stdout, "verification should use the checkpoint's own val split"
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.int8.onnx", "model.onnx"], "no .data file"
    onnx.checker.check_model(str(out), full_check=True)
    int8 = onnx.load(str(out.with_suffix(".int8.onnx")))
    assert any(node.op_type == "QuantizeLinear" for node in int8.graph.node)
    assert out.with_suffix(".int8.onnx").stat().st_size < out.stat().st_size / 2
    assert "runs 3 of 3 convolutions as int8" in stdout, stdout


def test_dynamic_batch_and_metadata_round_trip(cnn3_export, target_run, demo_data):
    out, _ = cnn3_export
    checkpoint = load_checkpoint(target_run / "best.pt")
    classifier = OnnxClassifier(out)
    assert classifier.classes == checkpoint["classes"]
    assert classifier.image_size == checkpoint["image_size"]
    metadata = classifier.metadata
    assert json.loads(metadata["mean"]) == pytest.approx(checkpoint["mean"])
    assert json.loads(metadata["std"]) == pytest.approx(checkpoint["std"])
    assert metadata["source_checkpoint_sha256"] == file_hash(target_run / "best.pt")
    assert metadata["output"] == "probabilities" and metadata["toolkit_version"]
    assert OnnxClassifier(out.with_suffix(".int8.onnx")).classes == checkpoint["classes"]
    images = load_split(demo_data, "val", "target").images[:7]
    expected = predict_probs(model_from_checkpoint(checkpoint), images, checkpoint["mean"], checkpoint["std"],
                             torch.device("cpu")).numpy()
    pixels = images.permute(0, 2, 3, 1).numpy()
    for batch in (1, 7):
        probs = classifier.session.run(None, {classifier.input_name: pixels[:batch]})[0]
        assert probs.shape == (batch, 2)
        np.testing.assert_allclose(probs, expected[:batch], atol=1e-4)
    with pytest.raises(UserError, match="expects uint8"):
        classifier.predict_proba(pixels.astype(np.float32))


def test_resnet18_raw_logits_export_is_verified(resnet18_export):
    run, stdout = resnet18_export
    rows = _val_rows(stdout)
    assert set(rows) == {"batch1", "batch64"} and all(d <= 1e-4 for d in rows.values()), stdout
    classifier = OnnxClassifier(run / "model.onnx")
    assert classifier.metadata["output"] == "logits" and classifier.metadata["architecture"] == "resnet18"
    raw = classifier.session.run(None, {classifier.input_name: np.zeros((3, 64, 64, 3), np.uint8)})[0]
    probs = classifier.predict_proba(np.zeros((3, 64, 64, 3), np.uint8))
    assert not np.allclose(raw.sum(1), 1) and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_predict_runs_without_torch_and_matches_pytorch(cnn3_export, target_run, demo_data, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "torch.py").write_text("raise ImportError('torch is blocked in this test')\n")
    env = {"PYTHONPATH": str(blocker)}
    probe = subprocess.run([sys.executable, "-c", "import torch"], env={**os.environ, **env}, capture_output=True)
    assert probe.returncode != 0, "the blocker does not block torch; the test would prove nothing"
    val = load_split(demo_data, "val", "target")
    files = [demo_data / "images" / name for name in val.filenames]
    result = run_script("predict.py", cnn3_export[0], *files, "--json", "--top-k", "2", env=env)
    predictions = json.loads(result.stdout)
    checkpoint = load_checkpoint(target_run / "best.pt")
    probs = predict_probs(model_from_checkpoint(checkpoint), val.images, checkpoint["mean"], checkpoint["std"],
                          torch.device("cpu"))
    expected = [checkpoint["classes"][i] for i in probs.argmax(1).tolist()]
    assert [p["file"] for p in predictions] == [str(f) for f in files]
    assert [p["predictions"][0]["label"] for p in predictions] == expected
    assert all(len(p["predictions"]) == 2 for p in predictions)
    lines = run_script("predict.py", cnn3_export[0], files[0].parent, env=env).stdout.splitlines()
    assert len(lines) == len(list(files[0].parent.glob("*.png"))) and len(lines[0].split("\t")) == 3


def _one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_bad_models_and_images_give_one_line_errors(cnn3_export, target_run, demo_data, tmp_path):
    out, _ = cnn3_export
    image = next((demo_data / "images").glob("*.png"))
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(out.read_bytes()[:5000])
    _one_line_error(run_script("predict.py", corrupt, image, check=False), str(corrupt))
    bad_image = tmp_path / "broken.png"
    bad_image.write_bytes(image.read_bytes()[:40])
    _one_line_error(run_script("predict.py", out, image, bad_image, check=False), str(bad_image))


def test_export_refuses_existing_output_and_failed_verification(cnn3_export, target_run, tmp_path, capsys):
    # In-process (the exit code and one-line form of a UserError are cli.run's): saves a
    # subprocess's torch import and export.
    import export
    out, _ = cnn3_export
    with pytest.raises(UserError, match="--overwrite"):
        export.main(export.get_args_parser().parse_args(["--checkpoint", str(target_run / "best.pt"),
                                                         "--out", str(out)]))
    # A checkpoint whose data has moved away is verified on generated images.
    moved = load_checkpoint(target_run / "best.pt")
    moved["args"]["data"] = str(tmp_path / "moved_away")
    save_checkpoint(moved, tmp_path / "moved.pt")
    strict = tmp_path / "strict" / "model.onnx"
    with pytest.raises(UserError, match=r"verification failed, nothing written: fp32 batch 1: max \|dp\| \d"):
        export.main(export.get_args_parser().parse_args(["--checkpoint", str(tmp_path / "moved.pt"),
                                                         "--out", str(strict), "--tolerance", "1e-30"]))
    assert "verifying on 64 generated images" in capsys.readouterr().out
    assert not strict.exists() and list(strict.parent.iterdir()) == [], "nothing may be left behind"


def test_external_data_outside_the_model_folder_is_refused(tmp_path):
    from onnx import helper, numpy_helper
    weight = numpy_helper.from_array(np.ones((3, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    (tmp_path / "secret.data").write_bytes(np.ones(9, np.float32).tobytes())
    (tmp_path / "models").mkdir()
    onnx.save(model, tmp_path / "models" / "model.onnx", save_as_external_data=True, location="w.data",
              size_threshold=0)
    with pytest.raises(UserError, match="not a model written by export.py"):
        OnnxClassifier(tmp_path / "models" / "model.onnx")  # loads: its data is beside it
    tampered = onnx.load(tmp_path / "models" / "model.onnx", load_external_data=False)
    for entry in tampered.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../secret.data"
    onnx.save(tampered, tmp_path / "models" / "model.onnx")
    with pytest.raises(UserError, match="model.onnx: not a loadable ONNX model"):
        OnnxClassifier(tmp_path / "models" / "model.onnx")
