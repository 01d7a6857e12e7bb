"""export.py's work as one call: a checkpoint becomes a verified set of ONNX files, or nothing.

The set (output_paths) is OUT, and beside it OUT's name with .int8.onnx and .optimized.onnx.
Every file is made in a scratch folder beside OUT: the fp32 model (lib.onnx_export), the
--optimize graph, both checked against PyTorch on real images (lib.image_sets) at batch 1 and
BIG_BATCH; then the int8 model, kept only if a recipe passes its gate (lib.quantize). Only then
are they moved into place, and an export replaces the whole set: a file of the set that this
export does not write is removed, because an earlier export's int8 model would pass for this
one's. A model failing verification is a UserError and nothing is written or removed; the gate
refusing every recipe is not an error: the rest is written and the result says so.
"""
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from lib import ensemble
from lib.checkpoint import build_from_checkpoint, file_hash, load_checkpoint
from lib.cli import make_folder
from lib.edge import OnnxClassifier
from lib.errors import UserError
from lib.image_sets import calibration_images, describe_images, loading_options, reference_images
from lib.int8_gate import Gate
from lib.onnx_export import (DEFAULT_OPSET, RUNTIME_FOR_OPSET, export_onnx, model_metadata, optimize_for_runtime,
                             stamp_metadata, to_nhwc, verification_table, verify)
from lib.quantize import DEFAULT_TARGET, quantize_gated, recipes_to_try

BIG_BATCH = 64  # the batch verified besides batch 1, and export.py --benchmark's


@dataclass(frozen=True)
class Int8Plan:
    """What --quantize int8 asks for: the target CPU (lib.quantize.TARGETS), the calibration
    method of the first recipe tried, how many training images calibrate, the gate to pass."""
    target: str = DEFAULT_TARGET
    calibration_method: str = "minmax"
    calibration_images: int = 256
    gate: Gate = Gate()


@dataclass
class ExportResult:
    """What an export wrote and removed, and what export.py --benchmark times."""
    outputs: dict         # {name: Path} of the whole set: fp32, int8, optimized
    written: list         # names of the models written, in that order
    removed: list         # Paths of an earlier export's files of the set that this one does not write
    int8_refused: bool    # int8 was asked for and the gate refused every recipe
    int8_attempts: list   # each recipe tried and its verdict (lib.quantize.quantize_gated)
    wrapper: object       # the exported network, pixels in (lib.onnx_export.PixelClassifier), in PyTorch
    pixels: np.ndarray    # uint8 (N, H, W, 3): the verification images

    def lines(self):
        """One line per file written (with its size) and per file removed, for people."""
        lines = [f"{name}: {self.outputs[name]} ({self.outputs[name].stat().st_size / 1e6:.2f} MB)"
                 for name in self.written]
        return lines + [f"removed {path}: an earlier export's {name} model, which this export does not write"
                        for name, path in self.outputs.items() if path in self.removed]


def output_paths(out):
    """{name: path} of the set of files an export to `out` (a .onnx path) may write: the fp32 model,
    and beside it the int8 and optimized ones; UserError for another suffix."""
    out = Path(out)
    if out.suffix != ".onnx":
        raise UserError(f"--out {out}: must end in .onnx")
    return {"fp32": out, "int8": out.with_suffix(".int8.onnx"), "optimized": out.with_suffix(".optimized.onnx")}


def install(staged, outputs):
    """Move the staged files ({name: path}) into place at outputs[name], then remove every other
    file of the set (output_paths), so that all a folder holds beside the fp32 model was made
    from it: an earlier export's int8 model would pass for this one's. Returns the removed paths."""
    for name, path in staged.items():
        os.replace(path, outputs[name])
    removed = [path for name, path in outputs.items() if name not in staged and path.exists()]
    for path in removed:
        path.unlink()
    return removed


def export_checkpoint(checkpoint_path, out, *, overwrite=False, raw_logits=False, opset=DEFAULT_OPSET,
                      verify_data=None, verify_split="val", synthetic_verify=False, tolerance=1e-4,
                      loading=None, optimize=False, int8=None, seed=0):
    """Export the checkpoint at checkpoint_path to the set of files at `out` (see the module's
    docstring); returns an ExportResult. Prints its progress: the export, the verification table,
    each int8 attempt.

    verify_data, verify_split, synthetic_verify: the images verified (and calibrated) on
    (lib.image_sets.reference_images); tolerance: the largest absolute difference of a probability
    from PyTorch's; loading: load_split's keyword arguments (lib.cli.load_options), completed from
    the checkpoint's run (lib.image_sets.loading_options); int8: an Int8Plan, or None for no int8
    model; seed: of the calibration sample. Raises UserError, before anything is written, for an
    existing set without `overwrite`, conflicting choices, and a model failing verification.
    """
    outputs = output_paths(out)
    existing = [str(p) for p in outputs.values() if p.exists()]
    if existing and not overwrite:
        raise UserError(f"--out: {', '.join(existing)} already exist(s); use --overwrite to replace them "
                        f"(an export replaces the set: OUT and its .int8.onnx and .optimized.onnx)")
    if synthetic_verify and verify_data:
        raise UserError("--verify-data and --synthetic-verify: give one or the other")
    if int8 and verify_split == "train":
        raise UserError("--verify-split train: --quantize calibrates on the train split, and a gate scored on the "
                        "calibration images would flatter the int8 model; verify on another split (default val)")
    checkpoint = load_checkpoint(checkpoint_path)
    network = build_from_checkpoint(checkpoint, f"checkpoint {checkpoint_path}")
    loading = loading_options(checkpoint, loading or {"skip_bad_images": False, "max_pixels": None})
    images, labels, source = reference_images(checkpoint, verify_data, verify_split, synthetic_verify,
                                              loading=loading)
    gflop = ensemble.gflop_per_image(checkpoint, network)
    metadata = model_metadata(checkpoint, file_hash(checkpoint_path), raw_logits, opset, source, gflop)
    make_folder(outputs["fp32"].parent, "--out")
    names = ["fp32", *(["int8"] if int8 else []), *(["optimized"] if optimize else [])]
    with tempfile.TemporaryDirectory(dir=outputs["fp32"].parent, prefix=".export.") as scratch:
        staged = {name: Path(scratch) / outputs[name].name for name in names}
        wrapper = export_onnx(network, checkpoint, metadata, staged["fp32"], raw_logits, opset)
        print(f"exported {ensemble.describe(checkpoint)} ({metadata['stem']} stem, {ensemble.cost(checkpoint, gflop)}; "
              f"opset {opset}, onnxruntime >= {RUNTIME_FOR_OPSET[opset]}, input uint8 "
              f"N,{checkpoint['image_size']},{checkpoint['image_size']},3 RGB) -> {outputs['fp32']}")
        if optimize:
            optimize_for_runtime(staged["fp32"], staged["optimized"])
            # It holds onnxruntime's own fused operators: only a runtime as new as this one knows them.
            stamp_metadata(staged["optimized"], {"min_onnxruntime": onnxruntime.__version__})
        print(f"verifying on {describe_images(source)} against PyTorch (tolerance {tolerance:g} on probabilities)")
        models = {name: (OnnxClassifier(path), True) for name, path in staged.items() if name != "int8"}
        rows, probs = verify(network, checkpoint, models, images, labels, BIG_BATCH, tolerance)
        print(verification_table(rows))
        failed = {name: row for name, row in rows.items() if row.get("within_tolerance") is False}
        if failed:
            worst = ", ".join(f"{name}: max |dp| {row['max_abs_diff']:.3g}, classes agree on "
                              f"{row['class_agreement']:.2%}" for name, row in failed.items())
            raise UserError(f"verification failed, nothing written: {worst} (--tolerance {tolerance:g})")
        pixels, attempts = to_nhwc(images), []
        if int8:
            calibration, calibrated_on = calibration_images(checkpoint, verify_data, synthetic_verify,
                                                            int8.calibration_images, seed, loading)
            kept, attempts = quantize_gated(staged["fp32"], staged["int8"], to_nhwc(calibration),
                                            recipes_to_try(int8.target, int8.calibration_method), int8.gate,
                                            pixels, probs["fp32"], labels,
                                            {"calibration_images": json.dumps(calibrated_on)}, BIG_BATCH)
            if kept is None:
                del staged["int8"]
        removed = install(staged, outputs)
    return ExportResult(outputs, list(staged), removed, bool(int8) and "int8" not in staged, attempts, wrapper,
                        pixels)


def eager_runner(wrapper):
    """(run, threads) for lib.benchmark.compare_engines: the export's wrapper as a callable on uint8
    (N, H, W, 3) numpy pixels, in inference mode, and torch's thread count."""
    wrapper.eval()

    def run(pixels):
        with torch.inference_mode():
            return wrapper(torch.from_numpy(pixels))
    return run, torch.get_num_threads()
