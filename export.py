"""Export a checkpoint to a verified, self-contained ONNX model that takes raw uint8 pixels.

Example: python export.py --checkpoint runs/target/best.pt --out runs/target/model.onnx --quantize int8
Input (N, H, W, 3) uint8 RGB, output (N, C) probabilities; see lib/edge.py for the contract.
The model is checked against PyTorch on real images at batch 1 and 64 before it is written:
a probability differing by more than --tolerance exits non-zero and writes nothing.
With --quantize int8 also writes OUT's name with .int8.onnx, with --optimize .optimized.onnx.
"""
import os
import tempfile
from pathlib import Path

import torch

from lib import cli
from lib.checkpoint import file_hash, load_checkpoint, model_from_checkpoint
from lib.errors import UserError
from lib.onnx_export import (OPSET, benchmark, export_onnx, fused_convolutions, model_metadata,
                             optimize_for_runtime, quantize_int8, reference_images, to_nhwc, verify)

BIG_BATCH = 64


def get_args_parser():
    parser = cli.make_parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="checkpoint to export (best.pt)")
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--raw-logits", action="store_true",
                        help="output the bare network's logits instead of probabilities")
    parser.add_argument("--verify-data", default=None,
                        help="dataset to verify and calibrate on (default: the checkpoint's own --data "
                             "when that folder exists, else generated images)")
    parser.add_argument("--verify-split", default="val",
                        help="split to verify on (of --verify-data or the checkpoint's own data)")
    parser.add_argument("--tolerance", type=cli.positive_float, default=1e-4,
                        help="largest allowed absolute difference of a probability from PyTorch's")
    parser.add_argument("--quantize", choices=["int8"], default=None,
                        help="also write a static int8 (QDQ) model calibrated on training images")
    parser.add_argument("--int8-activations", choices=["uint8", "int8"], default="uint8",
                        help="activation type of the int8 model (weights are always int8); uint8 lets "
                             "onnxruntime fuse every convolution on x86")
    parser.add_argument("--calibration-images", type=cli.positive_int, default=256,
                        help="training images used to calibrate --quantize")
    parser.add_argument("--optimize", action="store_true",
                        help="also write the graph as onnxruntime optimises it for this CPU")
    parser.add_argument("--benchmark", action="store_true",
                        help="print median latency of PyTorch eager and onnxruntime at batch 1 and 64")
    parser.add_argument("--benchmark-runs", type=cli.positive_int, default=20, help="timed runs per median")
    parser.add_argument("--seed", type=int, default=0, help="seed for choosing calibration images")
    return parser


def planned_outputs(out, quantize, optimize):
    out = Path(out)
    if out.suffix != ".onnx":
        raise UserError(f"--out {out}: must end in .onnx")
    outputs = {"fp32": out}
    if quantize:
        outputs["int8"] = out.with_suffix(".int8.onnx")
    if optimize:
        outputs["optimized"] = out.with_suffix(".optimized.onnx")
    return outputs


def print_verification(rows, reference):
    print(f"{'model':<22}{'max |dp|':>10}{'agree':>8}{'accuracy':>10}{'AUROC':>8}{'dAUROC':>9}")
    for name, row in rows.items():
        scores = (f"{row['accuracy']:>10.4f}{row['auroc']:>8.4f}{row['auroc'] - reference['auroc']:>+9.4f}"
                  if "accuracy" in row else "")
        print(f"{name:<22}{row['max_abs_diff']:>10.2e}{row['class_agreement']:>8.4f}{scores}")


def calibration_pixels(checkpoint, data, count, seed):
    images, _, source = reference_images(checkpoint, data, "train", count=count, seed=seed)
    chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:count]
    print(f"calibrating on {len(chosen)} of {source}")
    return to_nhwc(images[chosen])


def main(args):
    outputs = planned_outputs(args.out, args.quantize, args.optimize)
    existing = [str(p) for p in outputs.values() if p.exists()]
    if existing and not args.overwrite:
        raise UserError(f"--out: {', '.join(existing)} already exist(s); use --overwrite to replace")
    checkpoint = load_checkpoint(args.checkpoint)
    network = model_from_checkpoint(checkpoint, f"checkpoint {args.checkpoint}")
    images, labels, source = reference_images(checkpoint, args.verify_data, args.verify_split)
    metadata = model_metadata(checkpoint, file_hash(args.checkpoint), args.raw_logits)
    outputs["fp32"].parent.mkdir(parents=True, exist_ok=True)
    # Everything is written beside OUT first and moved into place only once verified.
    with tempfile.TemporaryDirectory(dir=outputs["fp32"].parent, prefix=".export.") as scratch:
        staged = {name: Path(scratch) / path.name for name, path in outputs.items()}
        wrapper = export_onnx(network, checkpoint, metadata, staged["fp32"], args.raw_logits)
        print(f"exported {checkpoint['model']} (opset {OPSET}, input uint8 N,{checkpoint['image_size']},"
              f"{checkpoint['image_size']},3 RGB) -> {outputs['fp32']}")
        if args.quantize:
            pixels = calibration_pixels(checkpoint, args.verify_data, args.calibration_images, args.seed)
            quantize_int8(staged["fp32"], staged["int8"], pixels, args.int8_activations)
            fused, total = fused_convolutions(staged["int8"])
            print(f"int8 ({args.int8_activations} activations): onnxruntime runs {fused} of {total} "
                  f"convolutions as int8 kernels")
        if args.optimize:
            optimize_for_runtime(staged["fp32"], staged["optimized"])
        print(f"verifying on {source} against PyTorch (tolerance {args.tolerance:g} on probabilities)")
        rows = verify(network, checkpoint, {name: (path, name != "int8") for name, path in staged.items()},
                      images, labels, BIG_BATCH, args.tolerance)
        print_verification(rows, rows["pytorch"])
        failed = {name: row for name, row in rows.items() if row.get("within_tolerance") is False}
        if failed:
            worst = ", ".join(f"{name}: max |dp| {row['max_abs_diff']:.3g}, classes agree on "
                              f"{row['class_agreement']:.2%}" for name, row in failed.items())
            raise UserError(f"verification failed, nothing written: {worst} (--tolerance {args.tolerance:g})")
        for name, path in staged.items():
            os.replace(path, outputs[name])
    for name, path in outputs.items():
        print(f"{name}: {path} ({path.stat().st_size / 1e6:.2f} MB)")
    if args.benchmark:
        table, threads = benchmark(wrapper, {n: p for n, p in outputs.items() if n != "optimized"},
                                   to_nhwc(images[:BIG_BATCH]), (1, BIG_BATCH), args.benchmark_runs)
        print(f"\nmedian latency, ms ({threads} thread(s), {args.benchmark_runs} runs)")
        print(f"| {'engine':<20} | {'batch 1':>9} | {'batch 64':>9} | {'b1 speed-up':>11} |")
        print(f"|{'-' * 22}|{'-' * 11}:|{'-' * 11}:|{'-' * 12}:|")
        eager = table["pytorch eager"][1]
        for name, times in table.items():
            print(f"| {name:<20} | {times[1]:>9.2f} | {times[BIG_BATCH]:>9.1f} | {eager / times[1]:>10.1f}x |")


if __name__ == "__main__":
    cli.run(main, get_args_parser())
