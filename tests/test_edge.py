"""predict.py and lib/edge: inference with onnxruntime, numpy and pillow only, torch-free (at run
time and by construction), equal to PyTorch's; one-line errors for bad models and images; EXIF
orientation applied as in training; models whose data points outside their folder refused; the
oldest supported onnxruntime gives the same probabilities."""
import ast
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from conftest import REPO, run_script
from lib.checkpoint import build_from_checkpoint, load_checkpoint
from lib.data import load_split
from lib.edge import OnnxClassifier
from lib.engine import predict_probs
from lib.errors import UserError
from lib.onnx_export import OLDEST_TESTED_ONNXRUNTIME, set_metadata
from test_export import OLD_ORT_PYTHON, _one_line_error


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
    probs = predict_probs(build_from_checkpoint(checkpoint), val.images, checkpoint["mean"], checkpoint["std"],
                          torch.device("cpu"))
    expected = [checkpoint["classes"][i] for i in probs.argmax(1).tolist()]
    assert [p["file"] for p in predictions] == [str(f) for f in files]
    assert [p["predictions"][0]["label"] for p in predictions] == expected
    assert all(len(p["predictions"]) == 2 for p in predictions)
    lines = run_script("predict.py", cnn3_export[0], files[0].parent, "--threads", "1", "--provider",
                       "CPUExecutionProvider", env=env).stdout.splitlines()
    assert len(lines) == len(list(files[0].parent.glob("*.png"))) and len(lines[0].split("\t")) == 3
    int8 = cnn3_export[0].with_suffix(".int8.onnx")
    report = json.loads(run_script("predict.py", "--benchmark", int8, "--benchmark-batch", "8",
                                   "--benchmark-runs", "3", "--json", env=env).stdout)
    assert report["file_size_mb"] == int8.stat().st_size / 1e6 and report["quantization"]["target"] == "x86"
    assert report["session_create_ms"] > 0 and report["first_run_ms"] > 0
    every = report["cpus"]
    assert [(r["threads"], r["batch"]) for r in report["latency"]] == [
        (t, b) for t in sorted({1, min(2, every), every}) for b in (1, 8)]
    assert all(0 < r["p50_ms"] <= r["p95_ms"] for r in report["latency"])
    text = run_script("predict.py", "--benchmark", int8, "--benchmark-runs", "2", env=env).stdout
    assert "session created" in text and "first run" in text and "p95 ms" in text, text


def _imports_reached(script):
    """Every module an `import` anywhere in `script` names (inside functions too, so a call that is
    not run in a test is covered), following the lib modules it reaches, lib/__init__.py included."""
    reached, todo = set(), [script, REPO / "lib" / "__init__.py"]
    while todo:
        tree = ast.parse(todo.pop().read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module == "lib":
                names = [f"lib.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module]
            else:
                continue
            for name in set(names) - reached:
                reached.add(name)
                if name.startswith("lib."):
                    todo.append(REPO / "lib" / f"{name.split('.')[1]}.py")
    return reached


def test_predict_py_reaches_no_torch_import_by_construction():
    """Not only what a run of predict.py imports (the test above) but every import statement of
    predict.py and of the lib modules it reaches (lib.cli, lib.edge, lib.images, ...)."""
    reached = _imports_reached(REPO / "predict.py")
    assert {"lib.cli", "lib.edge", "lib.images"} <= reached
    assert not {name for name in reached if name.split(".")[0] in ("torch", "torchvision")
                or name in ("lib.flags", "lib.augment", "lib.balance")}, sorted(reached)
    assert "torch" in _imports_reached(REPO / "train.py"), "the walk would not find torch; it proves nothing"


def test_bad_models_and_images_give_one_line_errors(cnn3_export, target_run, demo_data, tmp_path):
    out, _ = cnn3_export
    image = next((demo_data / "images").glob("*.png"))
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(out.read_bytes()[:5000])
    _one_line_error(run_script("predict.py", corrupt, image, check=False), str(corrupt))
    bad_image = tmp_path / "broken.png"
    bad_image.write_bytes(image.read_bytes()[:40])
    _one_line_error(run_script("predict.py", out, image, bad_image, check=False), str(bad_image))
    _one_line_error(run_script("predict.py", out, image, "--provider", "NoSuchExecutionProvider", check=False),
                    "--provider NoSuchExecutionProvider", "available: ", "CPUExecutionProvider")
    future = onnx.load(str(out))
    set_metadata(future, {"min_onnxruntime": "99.0"})
    onnx.save(future, tmp_path / "future.onnx")
    _one_line_error(run_script("predict.py", tmp_path / "future.onnx", image, check=False),
                    "future.onnx: needs onnxruntime >= 99.0")


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


def test_exif_orientation_is_applied_everywhere(cnn3_export, demo_data, tmp_path):
    """A photo stored sideways with a tag saying how to turn it upright is the upright photo."""
    from PIL import Image
    from lib.images import decode_image

    val = load_split(demo_data, "val", "target")
    upright = Image.open(demo_data / "images" / val.filenames[0]).convert("RGB").crop((0, 8, 64, 56))
    folder = tmp_path / "val" / "palace"
    folder.mkdir(parents=True)
    upright.save(folder / "upright.png")
    sideways = upright.transpose(Image.Transpose.ROTATE_90)  # as a camera held sideways stores it
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: turn 90 degrees clockwise to view
    sideways.save(folder / "tagged.png", exif=exif)
    sideways.save(tmp_path / "untagged.png")
    assert sideways.size != upright.size, "the test needs a photo that is not square"
    np.testing.assert_array_equal(decode_image(folder / "tagged.png", 64), decode_image(folder / "upright.png", 64))
    split = load_split(tmp_path, "val")
    assert torch.equal(split.images[0], split.images[1]), split.filenames
    result = run_script("predict.py", cnn3_export[0], folder / "upright.png", folder / "tagged.png",
                        tmp_path / "untagged.png", "--json", "--top-k", "2")
    probs = [{p["label"]: p["probability"] for p in row["predictions"]} for row in json.loads(result.stdout)]
    assert probs[0] == probs[1]
    assert probs[0] != probs[2], "the untagged sideways photo should look different to the model"


@pytest.mark.skipif(not OLD_ORT_PYTHON, reason=f"OLD_ORT_PYTHON is not set: the Python of a venv with "
                    f"onnxruntime=={OLDEST_TESTED_ONNXRUNTIME}, numpy<2 and pillow (.ci/run makes one)")
def test_oldest_onnxruntime_gives_the_same_probabilities(cnn3_export, target_run, demo_data, tmp_path):
    """predict.py under the oldest onnxruntime we claim, against this one: opsets 17 and 18
    (the default, float and int8) run with equal outputs; opset 19, and a graph onnxruntime 1.32
    optimised (--optimize), are refused in one line."""
    import onnxruntime

    import export
    version = subprocess.run([OLD_ORT_PYTHON, "-c", "import onnxruntime; print(onnxruntime.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version == OLDEST_TESTED_ONNXRUNTIME, f"OLD_ORT_PYTHON has onnxruntime {version}"
    for opset, extra in ((17, ["--optimize"]), (19, [])):
        export.main(export.get_args_parser().parse_args([
            "--checkpoint", str(target_run / "best.pt"), "--out", str(tmp_path / f"opset{opset}.onnx"),
            "--opset", str(opset), *extra]))
    val = load_split(demo_data, "val", "target")
    files = [str(demo_data / "images" / name) for name in val.filenames]

    def probabilities(python, model):
        result = subprocess.run([python, str(REPO / "predict.py"), str(model), *files, "--json", "--top-k", "2"],
                                capture_output=True, text=True, cwd=REPO)
        assert result.returncode == 0, result.stderr
        return np.array([[p["probability"] for p in sorted(row["predictions"], key=lambda p: p["label"])]
                         for row in json.loads(result.stdout)])

    int8 = cnn3_export[0].with_suffix(".int8.onnx")
    for model in (tmp_path / "opset17.onnx", cnn3_export[0], int8):
        np.testing.assert_allclose(probabilities(OLD_ORT_PYTHON, model), probabilities(sys.executable, model),
                                   rtol=0, atol=1e-5, err_msg=str(model))
    for model, needed in (("opset19.onnx", "1.16 (opset 19)"),
                          ("opset17.optimized.onnx", f"{onnxruntime.__version__} (opset 17)")):
        refused = subprocess.run([OLD_ORT_PYTHON, str(REPO / "predict.py"), str(tmp_path / model), files[0]],
                                 capture_output=True, text=True, cwd=REPO)
        _one_line_error(refused, f"{model}: needs onnxruntime >= {needed}, this is {OLDEST_TESTED_ONNXRUNTIME}")
