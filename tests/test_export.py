"""export.py and lib/onnx_export: verified ONNX export, metadata, the output rule, opsets 17 and 18.
predict.py and lib/edge: test_edge.py; int8: test_int8.py; exported models against PyTorch:
test_onnx_parity.py."""
import copy
import csv
import json
import os
import shutil
import subprocess

import numpy as np
import onnx
import pytest
import torch

from conftest import run_main, run_script
from lib.checkpoint import build_from_checkpoint, file_hash, load_checkpoint, read_preprocessing, save_checkpoint
from lib.data import load_split
from lib.edge import OnnxClassifier, read_metadata
from lib.errors import UserError
from lib.flops import inference_flops
from lib.inference import predict_probs
from lib.models import build_model
from lib.onnx_export import DEFAULT_OPSET, RUNTIME_FOR_OPSET, downgrade, export_onnx


@pytest.fixture(scope="module")
def resnet18_export(demo_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("resnet18")
    # Small batches: enough steps for BatchNorm's running statistics to leave their initial values.
    run_script("train.py", "--data", demo_data, "--task", "target", "--model", "resnet18", "--stem", "stock",
               "--epochs", "1", "--batch-size", "16", "--lr", "1e-3", "--out", run)
    result = run_script("export.py", "--checkpoint", run / "best.pt", "--out", run / "model.onnx", "--raw-logits")
    return run, result.stdout


def _val_rows(stdout):
    return {line.split()[1] + line.split()[2]: float(line.split()[3])
            for line in stdout.splitlines() if line.startswith("fp32 batch")}


def test_cnn3_export_is_verified_self_contained_and_quantized(cnn3_export, demo_data):
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
    assert ("int8 attempt 1 of 4: x86 (uint8 activations, int8 weights per channel, reduce_range True), minmax "
            "calibration; onnxruntime runs 3 of 3 convolutions as int8 kernels") in stdout, stdout
    assert f"int8 calibration images: 80 of 80 images of {demo_data} (train): portico_rotunda 40, palace 40" in stdout
    recorded = json.loads(OnnxClassifier(out.with_suffix(".int8.onnx")).metadata["int8_gate"])
    assert recorded["passed"] and recorded["images"] == 60 and recorded["thresholds"]["max_auroc_loss"] == 0.005
    # This 3-epoch cnn3 scores every image near p = 0.5: nothing is confident, so labels decide.
    assert recorded["confident_images"] == 0 and recorded["confident_agreement"] is None
    assert f"AUROC {recorded['auroc_fp32']:.4f} -> {recorded['auroc_int8']:.4f}, loss {recorded['auroc_loss']:+.4f}" in stdout
    assert "int8 gate passed: kept attempt 1" in stdout, stdout


def test_dynamic_batch_and_metadata_round_trip(cnn3_export, target_run, demo_data):
    out, _ = cnn3_export
    checkpoint = load_checkpoint(target_run / "best.pt")
    classifier = OnnxClassifier(out)
    assert classifier.preprocessing == read_preprocessing(checkpoint), "the record the checkpoint gives"
    metadata = classifier.metadata
    assert json.loads(metadata["mean"]) == pytest.approx(checkpoint["mean"])
    assert json.loads(metadata["std"]) == pytest.approx(checkpoint["std"])
    assert metadata["source_checkpoint_sha256"] == file_hash(target_run / "best.pt")
    assert metadata["output"] == "probabilities" and metadata["toolkit_version"]
    data = str(demo_data.resolve())
    assert json.loads(metadata["verification_images"]) == {"data": data, "split": "val", "count": 60}
    assert (metadata["opset"], metadata["min_onnxruntime"]) == (str(DEFAULT_OPSET), RUNTIME_FOR_OPSET[DEFAULT_OPSET])
    int8 = OnnxClassifier(out.with_suffix(".int8.onnx"))
    assert int8.preprocessing == classifier.preprocessing
    assert int8.metadata["min_onnxruntime"] == metadata["min_onnxruntime"]
    assert json.loads(int8.metadata["quantization"])["target"] == "x86"
    assert json.loads(int8.metadata["calibration_images"]) == {
        "data": data, "split": "train", "count": 80, "class_counts": {"portico_rotunda": 40, "palace": 40}}
    for path in (out, out.with_suffix(".int8.onnx")):
        # The IR version an old onnxruntime accepts, the opset asked for and no other opset imports;
        # and lib.edge's own reading of the metadata (no onnx package on a device) agrees with onnx's.
        model = onnx.load(str(path))
        assert model.ir_version == 8, "opset 18 needs IR version 8, not the exporter's 10"
        assert [(o.domain, o.version) for o in model.opset_import] == [("", DEFAULT_OPSET)]
        assert read_metadata(path) == {p.key: p.value for p in model.metadata_props}
    images = load_split(demo_data, "val", "target").images[:7]
    expected = predict_probs(build_from_checkpoint(checkpoint), images, checkpoint["mean"], checkpoint["std"],
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
    # The exact network: with torchvision's max-pool, a quarter of the no-max-pool variant's FLOPs.
    network = build_from_checkpoint(load_checkpoint(run / "best.pt"))
    assert classifier.metadata["stem"] == "stock" and isinstance(network.maxpool, torch.nn.MaxPool2d)
    assert float(classifier.metadata["gflop_per_image"]) == pytest.approx(inference_flops(network, 64) / 1e9,
                                                                          abs=1e-4)
    assert "stock stem, 0.29" in stdout
    raw = classifier.session.run(None, {classifier.input_name: np.zeros((3, 64, 64, 3), np.uint8)})[0]
    probs = classifier.predict_proba(np.zeros((3, 64, 64, 3), np.uint8))
    assert not np.allclose(raw.sum(1), 1) and np.allclose(probs.sum(1), 1, atol=1e-5)


def _one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_export_refuses_existing_output_and_failed_verification(cnn3_export, target_run, tmp_path, capsys):
    # In-process (the exit code and one-line form of a UserError are cli.run's): saves a
    # subprocess's torch import and export.
    import export
    out, _ = cnn3_export
    with pytest.raises(UserError, match="--overwrite"):
        export.main(export.get_args_parser().parse_args(["--checkpoint", str(target_run / "best.pt"),
                                                         "--out", str(out)]))
    # A checkpoint whose data has moved away is not verified on made-up images unless asked to.
    moved = load_checkpoint(target_run / "best.pt")
    moved["args"]["data"] = str(tmp_path / "moved_away")
    save_checkpoint(moved, tmp_path / "moved.pt")
    strict = tmp_path / "strict" / "model.onnx"
    arguments = ["--checkpoint", str(tmp_path / "moved.pt"), "--out", str(strict), "--tolerance", "1e-30"]
    with pytest.raises(UserError, match=r"moved_away is not here; give --verify-data DIR, or --synthetic-verify"):
        export.main(export.get_args_parser().parse_args(arguments))
    with pytest.raises(UserError, match=r"verification failed, nothing written: fp32 batch 1: max \|dp\| \d"):
        export.main(export.get_args_parser().parse_args(arguments + ["--synthetic-verify"]))
    assert "verifying on 64 generated drawings (--synthetic-verify)" in capsys.readouterr().out
    assert not strict.exists() and list(strict.parent.iterdir()) == [], "nothing may be left behind"


def test_overwrite_replaces_the_whole_set_of_siblings(target_run, tmp_path):
    """An earlier export of another checkpoint left an int8 and an optimized model beside OUT: an
    export that writes neither refuses without --overwrite, and with it removes them, so nothing
    beside the new model.onnx belongs to another model."""
    out = tmp_path / "model.onnx"
    siblings = [out.with_suffix(".int8.onnx"), out.with_suffix(".optimized.onnx")]
    for path in siblings:
        path.write_bytes(b"another checkpoint's model")
    command = ["export.py", "--checkpoint", target_run / "best.pt", "--out", out]
    _one_line_error(run_main(*command, check=False), str(siblings[0]), str(siblings[1]), "--overwrite")
    assert not out.exists() and all(path.exists() for path in siblings), "a refusal writes and removes nothing"
    result = run_main(*command, "--overwrite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"], result.stdout
    assert all(f"removed {path}" in result.stdout for path in siblings), result.stdout
    assert OnnxClassifier(out).metadata["source_checkpoint_sha256"] == file_hash(target_run / "best.pt")


def test_a_run_that_skipped_a_broken_val_image_exports(demo_data, tmp_path):
    """Trained with --skip-bad-images on data with one broken val file, the model exports (on the
    val images that run read), and export.py accepts every flag its loading errors name."""
    import export
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    with open(demo_data / "landmarks.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["task"] == "target" and r["partition"] in ("train", "val")][::2]
    with open(data / "landmarks.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        shutil.copy(demo_data / "images" / row["filename"], data / "images" / row["filename"])
    broken = next(data / "images" / r["filename"] for r in rows if r["partition"] == "val")
    broken.write_bytes(broken.read_bytes()[:40])
    run_main("train.py", "--data", data, "--task", "target", "--model", "cnn3", "--epochs", "1",
             "--skip-bad-images", "--out", tmp_path / "run")
    result = run_main("export.py", "--checkpoint", tmp_path / "run" / "best.pt", "--out", tmp_path / "model.onnx",
                      "--no-pixel-cache")
    assert "skipped 1 unreadable image(s)" in result.stderr, result.stderr
    verified = json.loads(OnnxClassifier(tmp_path / "model.onnx").metadata["verification_images"])
    assert verified["count"] == sum(r["partition"] == "val" for r in rows) - 1
    flags = export.get_args_parser().parse_args(["--checkpoint", "c.pt", "--out", "m.onnx", "--skip-bad-images",
                                                 "--max-image-pixels", "0", "--pixel-cache", "cache",
                                                 "--no-pixel-cache"])
    assert (flags.skip_bad_images, flags.max_image_pixels, flags.no_pixel_cache) == (True, 0, True)
    (tmp_path / "empty").mkdir()
    checkpoint = ["--checkpoint", tmp_path / "run" / "best.pt", "--out", tmp_path / "other.onnx"]
    _one_line_error(run_main("export.py", *checkpoint, "--verify-data", tmp_path / "empty", check=False),
                    f"export.py: error: --verify-data {tmp_path / 'empty'}: neither layout")
    _one_line_error(run_main("export.py", *checkpoint, "--verify-split", "nope", check=False),
                    "--verify-split: invalid choice: 'nope'")


@pytest.mark.parametrize("script", ["train", "transfer", "crossval", "evaluate", "explain", "export"])
def test_every_script_that_reads_a_split_accepts_the_flags_its_errors_name(script):
    """lib.data and lib.pixel_cache's errors name these flags: a script that loads images and lacks
    one sends its user to a flag it refuses (export.py did)."""
    import importlib
    parser = importlib.import_module(script).get_args_parser()
    options = {option for action in parser._actions for option in action.option_strings}
    assert {"--skip-bad-images", "--max-image-pixels", "--pixel-cache", "--no-pixel-cache"} <= options


def test_opset_17_is_written_for_a_torchvision_model(tmp_path):
    """torch writes opset 18 and converts down before its optimiser folds ReduceMean's axes, which
    failed for every torchvision model; ShuffleNetV2 has ReduceMean and a Split by num_outputs
    (which onnx's converter cannot take down), so both rewrites are exercised. Opset 17 is the
    only opset asked for, at IR version 8, and the graph computes what PyTorch does."""
    import onnxruntime
    torch.manual_seed(0)
    network = build_model("shufflenet_v2_x0_5", 2, 64).eval()
    wrapper = export_onnx(network, {"image_size": 64, "mean": [0.5] * 3, "std": [0.25] * 3}, {},
                          tmp_path / "model.onnx", opset=17)
    model = onnx.load(str(tmp_path / "model.onnx"))
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)] and model.ir_version == 8
    assert {"ReduceMean", "Slice"} <= {node.op_type for node in model.graph.node}
    pixels = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        expected = wrapper(torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(session.run(None, {"pixels": pixels})[0], expected, atol=1e-5)
    if OLD_ORT_PYTHON:  # and so does the oldest onnxruntime tested (.ci/run sets it)
        np.save(tmp_path / "pixels.npy", pixels)
        code = ("import sys, numpy, onnxruntime; session = onnxruntime.InferenceSession(sys.argv[1], "
                "providers=['CPUExecutionProvider']); numpy.save(sys.argv[3], session.run(None, "
                "{'pixels': numpy.load(sys.argv[2])})[0])")
        subprocess.run([OLD_ORT_PYTHON, "-c", code, tmp_path / "model.onnx", tmp_path / "pixels.npy",
                        tmp_path / "old.npy"], check=True)
        np.testing.assert_allclose(np.load(tmp_path / "old.npy"), expected, atol=1e-5)


def test_opset_17_rewrites_what_opset_18_changed_and_refuses_what_it_added():
    """Pad (Swin), ReduceMean with its axes as an input, Split by num_outputs: the opset-17 graph
    passes the full ONNX check and computes what the opset-18 one does; an operator new in 18
    is one line."""
    import onnxruntime
    from onnx import TensorProto, helper
    constants = [helper.make_tensor("pads", TensorProto.INT64, [4], [0, 1, 0, 1]),
                 helper.make_tensor("axes", TensorProto.INT64, [1], [1])]
    graph = helper.make_graph(
        [helper.make_node("Pad", ["x", "pads"], ["padded"]),
         helper.make_node("ReduceMean", ["padded", "axes"], ["mean"], keepdims=1, noop_with_empty_axes=0),
         helper.make_node("Split", ["padded"], ["left", "right"], axis=1, num_outputs=2)],
        "padded", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("mean", "left", "right")],
        constants)
    newer = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    older = downgrade(copy.deepcopy(newer), 17)
    onnx.checker.check_model(older, full_check=True)
    assert [(o.domain, o.version) for o in older.opset_import] == [("", 17)]
    assert "axes" not in {t.name for t in older.graph.initializer}, "the axes, now an attribute, are not left over"
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    sessions = [onnxruntime.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                for m in (newer, older)]
    for new, old in zip(*(session.run(None, {"x": x}) for session in sessions)):
        np.testing.assert_array_equal(new, old)
    graph = helper.make_graph(
        [helper.make_node("CenterCropPad", ["x", "shape"], ["y"])], "crop",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor("shape", TensorProto.INT64, [2], [2, 2])])
    with pytest.raises(UserError, match=r"^--opset 17: the graph's CenterCropPad is new in opset 18, which opset 17 "
                                        r"cannot express; --opset 18 needs onnxruntime >= 1.14$"):
        downgrade(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), 17)


OLD_ORT_PYTHON = os.environ.get("OLD_ORT_PYTHON")
