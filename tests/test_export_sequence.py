"""lib.export_set.export_checkpoint, called directly: export, verify, the int8 gate and the
replacement of the whole set of files, and the result export.py prints."""
import json

import numpy as np
import pytest

import lib.export_set
from lib.edge import OnnxClassifier
from lib.errors import UserError
from lib.export_set import Int8Plan, export_checkpoint


def test_an_export_replaces_the_whole_set_and_names_what_it_removed(target_run, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    siblings = [out.with_suffix(".int8.onnx"), out.with_suffix(".optimized.onnx")]
    for path in siblings:
        path.write_bytes(b"another checkpoint's model")
    with pytest.raises(UserError, match="--overwrite"):
        export_checkpoint(target_run / "best.pt", out)
    assert not out.exists() and all(path.exists() for path in siblings), "a refusal writes and removes nothing"
    result = export_checkpoint(target_run / "best.pt", out, overwrite=True)
    assert result.written == ["fp32"] and result.removed == siblings and not result.int8_refused
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    verified = json.loads(OnnxClassifier(out).metadata["verification_images"])
    assert result.pixels.shape == (verified["count"], 64, 64, 3) and result.pixels.dtype == np.uint8
    lines = result.lines()
    assert lines[0].startswith(f"fp32: {out} (") and lines[1:] == [
        f"removed {siblings[0]}: an earlier export's int8 model, which this export does not write",
        f"removed {siblings[1]}: an earlier export's optimized model, which this export does not write"]
    printed = capsys.readouterr().out
    assert f"-> {out}" in printed and "verifying on" in printed and "fp32 batch 64" in printed


def test_a_refused_int8_model_leaves_the_verified_ones_and_is_reported(target_run, tmp_path, monkeypatch):
    """The gate refusing every recipe is an outcome, not an error: fp32 and optimized are written, an
    earlier int8 model is removed, and the gate judged the verification images, not the calibration ones."""
    seen = {}

    def refuse_all(fp32_path, out, calibration_pixels, recipes, gate, pixels, float_probs, labels, metadata,
                   batch_size):
        seen.update(calibration=calibration_pixels, pixels=pixels, gate=gate, metadata=metadata)
        return None, [{"recipe": recipe, "verdict": {"passed": False}} for recipe in recipes]
    monkeypatch.setattr(lib.export_set, "quantize_gated", refuse_all)
    out = tmp_path / "model.onnx"
    out.with_suffix(".int8.onnx").write_bytes(b"an earlier run's model")
    plan = Int8Plan(calibration_images=8)
    result = export_checkpoint(target_run / "best.pt", out, overwrite=True, optimize=True, int8=plan, seed=3)
    assert result.int8_refused and result.written == ["fp32", "optimized"] and len(result.int8_attempts) == 4
    assert result.removed == [out.with_suffix(".int8.onnx")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.optimized.onnx"]
    assert seen["gate"] is plan.gate and np.array_equal(seen["pixels"], result.pixels)
    assert seen["calibration"].shape == (8, 64, 64, 3)
    calibrated_on = json.loads(seen["metadata"]["calibration_images"])
    assert calibrated_on["split"] == "train" and calibrated_on["count"] == 8
