"""Export a checkpoint to a verified, self-contained ONNX model that takes raw uint8 pixels.

Example: python export.py --checkpoint runs/target/best.pt --out runs/target/model.onnx --quantize int8 --target arm64
Input (N, H, W, 3) uint8 RGB, output (N, C) probabilities; see lib/edge.py for the contract.
An ensemble checkpoint (transfer.py --seeds, ensemble.py) becomes one graph that runs every
member and outputs the mean of their probabilities.
The model is checked against PyTorch on real images at batch 1 and 64 before it is written:
a probability differing by more than --tolerance exits non-zero and writes nothing.
With --quantize int8 also writes OUT's name with .int8.onnx, with --optimize .optimized.onnx
(--overwrite replaces the whole set: a sibling this export does not write is removed);
the int8 model is written only if it passes its gate (lib.int8_gate), trying more precise
recipes (lib.quantize.recipes_to_try) before giving up.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import onnxruntime

from lib import cli, ensemble, flags
from lib.checkpoint import build_from_checkpoint, file_hash, load_checkpoint
from lib.data import SPLITS
from lib.edge import OnnxClassifier
from lib.errors import UserError
from lib.onnx_export import (DEFAULT_OPSET, RUNTIME_FOR_OPSET, benchmark, benchmark_table, describe_images,
                             export_onnx, install, loading_options, model_metadata, optimize_for_runtime,
                             output_paths, reference_images, stamp_metadata, to_nhwc, verification_table, verify)
from lib.int8_gate import Gate
from lib.quantize import CALIBRATION_METHODS, DEFAULT_TARGET, TARGETS, calibration_set, quantize_gated, recipes_to_try

BIG_BATCH = 64
INT8_REFUSED = 3
EXIT_CODES = f"""exit codes:
  0    every model asked for is verified and written
  2    bad input (file, flag, data), or the fp32 model failed verification: nothing written
  {INT8_REFUSED}    the fp32 model (and --optimize's) is verified and written, but the int8 gate refused
       every recipe: no .int8.onnx (an earlier one at that path is removed)
  130  interrupted (Ctrl-C)
"""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help, and the exit codes laid out as written."""


def get_args_parser():
    parser = cli.make_parser(__doc__)
    parser.formatter_class, parser.epilog = HelpFormatter, EXIT_CODES
    parser.add_argument("--checkpoint", required=True, help="checkpoint to export (best.pt)")
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--raw-logits", action="store_true",
                        help="output the bare network's logits instead of probabilities")
    parser.add_argument("--opset", type=int, choices=sorted(RUNTIME_FOR_OPSET), default=DEFAULT_OPSET,
                        help="ONNX opset; the oldest onnxruntime that runs it is written to the metadata "
                             "(17: 1.12, 18: 1.14, 19: 1.16, 20: 1.17, 21: 1.18)")
    verification = parser.add_argument_group("verification and calibration images")
    verification.add_argument("--verify-data", default=None,
                              help="dataset to verify and calibrate on (default: the checkpoint's own --data)")
    verification.add_argument("--verify-split", choices=SPLITS, default="val",
                              help="split to verify on; with --quantize not train, which calibrates")
    verification.add_argument("--synthetic-verify", action="store_true",
                              help="verify and calibrate on generated drawings instead of real images")
    verification.add_argument("--tolerance", type=cli.positive_float, default=1e-4,
                              help="largest allowed absolute difference of a probability from PyTorch's")
    flags.add_loading_args(verification, from_checkpoint=True)
    int8 = parser.add_argument_group("int8")
    int8.add_argument("--quantize", choices=["int8"], default=None,
                      help="also write a static int8 (QDQ) model calibrated on training images")
    int8.add_argument("--target", choices=list(TARGETS), default=DEFAULT_TARGET,
                      help="CPU the int8 model is for: x86 (any x86-64; 7-bit weights avoid saturation "
                           "without VNNI), x86-vnni (AVX512-VNNI/AVX-VNNI/AMX), arm64 (int8 activations)")
    int8.add_argument("--calibration-method", choices=CALIBRATION_METHODS, default="minmax",
                      help="how activation ranges are chosen from the calibration images, in the first recipe "
                           "tried; when the gate refuses it: the other of minmax and percentile, this one with "
                           "the first and last layers in float, entropy")
    int8.add_argument("--calibration-images", type=cli.positive_int, default=256,
                      help="training images used to calibrate --quantize")
    gate = parser.add_argument_group("int8 gate (on the verification images; see lib/int8_gate.py)")
    gate.add_argument("--min-confident-agreement", type=cli.positive_float, default=Gate.min_confident_agreement,
                      help="least top-1 agreement with the fp32 model on the images it is confident about")
    gate.add_argument("--confident-above", type=cli.positive_float, default=Gate.confident_above,
                      help="fp32 top probability from which an image counts as confident")
    gate.add_argument("--max-accuracy-loss", type=cli.non_negative_float, default=Gate.max_accuracy_loss,
                      help="refuse int8 when it loses more accuracy than this, beyond noise (McNemar's exact test)")
    gate.add_argument("--max-auroc-loss", type=cli.non_negative_float, default=Gate.max_auroc_loss,
                      help="refuse int8 when it loses more AUROC than this, beyond noise (paired bootstrap)")
    gate.add_argument("--gate-level", type=cli.unit_interval, default=Gate.level,
                      help="confidence level of both tests (two-sided)")
    parser.add_argument("--optimize", action="store_true",
                        help="also write the graph as onnxruntime optimises it for this CPU")
    parser.add_argument("--benchmark", action="store_true",
                        help="print median latency of PyTorch eager and onnxruntime at batch 1 and 64")
    parser.add_argument("--benchmark-runs", type=cli.positive_int, default=20, help="timed runs per median")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for choosing calibration images and for the gate's bootstrap")
    return parser


def main(args):
    outputs = output_paths(args.out)
    written = [name for name, wanted in (("fp32", True), ("int8", args.quantize), ("optimized", args.optimize))
               if wanted]
    existing = [str(p) for p in outputs.values() if p.exists()]
    if existing and not args.overwrite:
        raise UserError(f"--out: {', '.join(existing)} already exist(s); use --overwrite to replace them "
                        f"(an export replaces the set: OUT and its .int8.onnx and .optimized.onnx)")
    if args.synthetic_verify and args.verify_data:
        raise UserError("--verify-data and --synthetic-verify: give one or the other")
    if args.quantize and args.verify_split == "train":
        raise UserError("--verify-split train: --quantize calibrates on the train split, and a gate scored on the "
                        "calibration images would flatter the int8 model; verify on another split (default val)")
    checkpoint = load_checkpoint(args.checkpoint)
    network = build_from_checkpoint(checkpoint, f"checkpoint {args.checkpoint}")
    loading = loading_options(checkpoint, cli.load_options(args))
    images, labels, source = reference_images(checkpoint, args.verify_data, args.verify_split, args.synthetic_verify,
                                              loading=loading)
    gflop = ensemble.gflop_per_image(checkpoint, network)
    metadata = model_metadata(checkpoint, file_hash(args.checkpoint), args.raw_logits, args.opset, source, gflop)
    cli.make_folder(outputs["fp32"].parent, "--out")
    # Everything is written beside OUT first and moved into place only once verified.
    with tempfile.TemporaryDirectory(dir=outputs["fp32"].parent, prefix=".export.") as scratch:
        staged = {name: Path(scratch) / outputs[name].name for name in written}
        wrapper = export_onnx(network, checkpoint, metadata, staged["fp32"], args.raw_logits, args.opset)
        print(f"exported {ensemble.describe(checkpoint)} ({metadata['stem']} stem, {ensemble.cost(checkpoint, gflop)}; "
              f"opset {args.opset}, onnxruntime >= {RUNTIME_FOR_OPSET[args.opset]}, input uint8 "
              f"N,{checkpoint['image_size']},{checkpoint['image_size']},3 RGB) -> {outputs['fp32']}")
        if args.optimize:
            optimize_for_runtime(staged["fp32"], staged["optimized"])
            # It holds onnxruntime's own fused operators: only a runtime as new as this one knows them.
            stamp_metadata(staged["optimized"], {"min_onnxruntime": onnxruntime.__version__})
        print(f"verifying on {describe_images(source)} against PyTorch (tolerance {args.tolerance:g} on probabilities)")
        models = {name: (OnnxClassifier(path), True) for name, path in staged.items() if name != "int8"}
        rows, probs = verify(network, checkpoint, models, images, labels, BIG_BATCH, args.tolerance)
        print(verification_table(rows))
        failed = {name: row for name, row in rows.items() if row.get("within_tolerance") is False}
        if failed:
            worst = ", ".join(f"{name}: max |dp| {row['max_abs_diff']:.3g}, classes agree on "
                              f"{row['class_agreement']:.2%}" for name, row in failed.items())
            raise UserError(f"verification failed, nothing written: {worst} (--tolerance {args.tolerance:g})")
        if args.quantize:
            pixels, calibrated_on = calibration_set(checkpoint, args.verify_data, args.synthetic_verify,
                                                    args.calibration_images, args.seed, loading)
            gate = Gate(args.min_confident_agreement, args.confident_above, args.max_accuracy_loss,
                        args.max_auroc_loss, args.gate_level, seed=args.seed)
            kept, attempts = quantize_gated(staged["fp32"], staged["int8"], pixels,
                                            recipes_to_try(args.target, args.calibration_method), gate,
                                            to_nhwc(images), probs["fp32"], labels,
                                            {"calibration_images": json.dumps(calibrated_on)}, BIG_BATCH)
            if kept is None:
                del staged["int8"]
        removed = install(staged, outputs)
    refused = args.quantize and "int8" not in staged
    stale = outputs["int8"] in removed
    for name in staged:
        print(f"{name}: {outputs[name]} ({outputs[name].stat().st_size / 1e6:.2f} MB)")
    for name, path in outputs.items():
        if path in removed:
            print(f"removed {path}: an earlier export's {name} model, which this export does not write")
    if args.benchmark:
        table, threads = benchmark(wrapper, {n: outputs[n] for n in staged if n != "optimized"},
                                   to_nhwc(images[:BIG_BATCH]), (1, BIG_BATCH), args.benchmark_runs)
        print(benchmark_table(table, threads, args.benchmark_runs, BIG_BATCH))
    if refused:
        print(f"export.py: warning: the int8 gate refused all {len(attempts)} recipes for --target {args.target}: "
              f"no int8 model{' (the earlier one at ' + str(outputs['int8']) + ' is removed)' if stale else ''}; "
              f"the verified fp32 model is written: {outputs['fp32']}", file=sys.stderr)
        return INT8_REFUSED
    return 0


if __name__ == "__main__":
    cli.run(main, get_args_parser())
