"""Export a checkpoint to a verified, self-contained ONNX model that takes raw uint8 pixels.

Example: python export.py --checkpoint runs/target/best.pt --out runs/target/model.onnx --quantize int8 --target arm64
Input (N, H, W, 3) uint8 RGB, output (N, C) probabilities; see lib/edge.py for the contract.
The model is checked against PyTorch on real images at batch 1 and 64 before it is written:
a probability differing by more than --tolerance exits non-zero and writes nothing. So does an
int8 model that fails its gate (top-1 agreement with the float model, AUROC loss).
With --quantize int8 also writes OUT's name with .int8.onnx, with --optimize .optimized.onnx.
"""
import json
import os
import tempfile
from pathlib import Path

import onnxruntime
import torch

from lib import cli
from lib.checkpoint import build_from_checkpoint, file_hash, load_checkpoint
from lib.edge import OnnxClassifier
from lib.errors import UserError
from lib.flops import inference_flops
from lib.onnx_export import (DEFAULT_OPSET, RUNTIME_FOR_OPSET, benchmark, describe_images, export_onnx,
                             model_metadata, optimize_for_runtime, reference_images, stamp_metadata, to_nhwc,
                             verify)
from lib.quantize import (CALIBRATION_METHODS, DEFAULT_TARGET, TARGETS, class_counts, fused_convolutions,
                          gate_failures, gate_scores, quantize_int8, recipe)

BIG_BATCH = 64


def get_args_parser():
    parser = cli.make_parser(__doc__)
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
    verification.add_argument("--verify-split", default="val", help="split to verify on")
    verification.add_argument("--synthetic-verify", action="store_true",
                              help="verify and calibrate on generated drawings instead of real images")
    verification.add_argument("--tolerance", type=cli.positive_float, default=1e-4,
                              help="largest allowed absolute difference of a probability from PyTorch's")
    int8 = parser.add_argument_group("int8")
    int8.add_argument("--quantize", choices=["int8"], default=None,
                      help="also write a static int8 (QDQ) model calibrated on training images")
    int8.add_argument("--target", choices=list(TARGETS), default=DEFAULT_TARGET,
                      help="CPU the int8 model is for: x86 (any x86-64; 7-bit weights avoid saturation "
                           "without VNNI), x86-vnni (AVX512-VNNI/AVX-VNNI/AMX), arm64 (int8 activations)")
    int8.add_argument("--calibration-method", choices=CALIBRATION_METHODS, default="minmax",
                      help="how activation ranges are chosen from the calibration images")
    int8.add_argument("--calibration-images", type=cli.positive_int, default=256,
                      help="training images used to calibrate --quantize")
    int8.add_argument("--min-agreement", type=cli.positive_float, default=0.99,
                      help="gate: least top-1 agreement of the int8 model with the float model")
    int8.add_argument("--max-auroc-loss", type=cli.non_negative_float, default=0.005,
                      help="gate: most AUROC the int8 model may lose against the float model")
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


def calibration_set(checkpoint, data, synthetic, count, method, seed):
    """(uint8 NHWC pixels, where they came from) for --quantize: a seeded sample of the training split."""
    images, labels, source = reference_images(checkpoint, data, "train", synthetic, count=count, seed=seed)
    chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:count]
    counts = class_counts(None if labels is None else labels[chosen], checkpoint["classes"])
    balance = ", ".join(f"{name} {n}" for name, n in counts.items()) if counts else "unlabelled"
    print(f"calibrating ({method}) on {len(chosen)} of {describe_images(source)}: {balance}")
    return to_nhwc(images[chosen]), {**source, "count": len(chosen), "class_counts": counts}


def print_gate(scores, min_agreement, max_auroc_loss):
    loss = "n/a (unlabelled images)" if scores["auroc_loss"] is None else f"{scores['auroc_loss']:+.4f}"
    print(f"int8 gate: top-1 agreement with fp32 {scores['agreement']:.4f} (at least {min_agreement:g}), "
          f"AUROC loss {loss} (at most {max_auroc_loss:g})")


def main(args):
    outputs = planned_outputs(args.out, args.quantize, args.optimize)
    existing = [str(p) for p in outputs.values() if p.exists()]
    if existing and not args.overwrite:
        raise UserError(f"--out: {', '.join(existing)} already exist(s); use --overwrite to replace")
    if args.synthetic_verify and args.verify_data:
        raise UserError("--verify-data and --synthetic-verify: give one or the other")
    checkpoint = load_checkpoint(args.checkpoint)
    network = build_from_checkpoint(checkpoint, f"checkpoint {args.checkpoint}")
    images, labels, source = reference_images(checkpoint, args.verify_data, args.verify_split, args.synthetic_verify)
    gflop = inference_flops(network, checkpoint["image_size"]) / 1e9
    metadata = model_metadata(checkpoint, file_hash(args.checkpoint), args.raw_logits, args.opset, source, gflop)
    runtime_config = TARGETS[args.target].runtime_config if args.quantize else {}
    outputs["fp32"].parent.mkdir(parents=True, exist_ok=True)
    # Everything is written beside OUT first and moved into place only once verified.
    with tempfile.TemporaryDirectory(dir=outputs["fp32"].parent, prefix=".export.") as scratch:
        staged = {name: Path(scratch) / path.name for name, path in outputs.items()}
        wrapper = export_onnx(network, checkpoint, metadata, staged["fp32"], args.raw_logits, args.opset)
        print(f"exported {checkpoint['model']} ({metadata['stem']} stem, {gflop:.3f} GFLOP per image; opset "
              f"{args.opset}, onnxruntime >= {RUNTIME_FOR_OPSET[args.opset]}, input uint8 "
              f"N,{checkpoint['image_size']},{checkpoint['image_size']},3 RGB) -> {outputs['fp32']}")
        if args.quantize:
            pixels, calibrated_on = calibration_set(checkpoint, args.verify_data, args.synthetic_verify,
                                                    args.calibration_images, args.calibration_method, args.seed)
            how = recipe(args.target, args.calibration_method)
            quantize_int8(staged["fp32"], staged["int8"], pixels, args.target, args.calibration_method,
                          {"quantization": json.dumps(how), "calibration_images": json.dumps(calibrated_on)})
            fused, total = fused_convolutions(staged["int8"], runtime_config)
            print(f"int8 for {args.target} ({how['activations']} activations, int8 weights per channel, "
                  f"reduce_range {how['reduce_range']}): onnxruntime runs {fused} of {total} convolutions as "
                  f"int8 kernels{' in its ARM graph' if args.target == 'arm64' else ''}")
        if args.optimize:
            optimize_for_runtime(staged["fp32"], staged["optimized"])
            # It holds onnxruntime's own fused operators: only a runtime as new as this one knows them.
            stamp_metadata(staged["optimized"], {"min_onnxruntime": onnxruntime.__version__})
        print(f"verifying on {describe_images(source)} against PyTorch (tolerance {args.tolerance:g} on probabilities)")
        models = {name: (OnnxClassifier(path, config=runtime_config if name == "int8" else None), name != "int8")
                  for name, path in staged.items()}
        rows, probs = verify(network, checkpoint, models, images, labels, BIG_BATCH, args.tolerance)
        print_verification(rows, rows["pytorch"])
        failed = {name: row for name, row in rows.items() if row.get("within_tolerance") is False}
        if failed:
            worst = ", ".join(f"{name}: max |dp| {row['max_abs_diff']:.3g}, classes agree on "
                              f"{row['class_agreement']:.2%}" for name, row in failed.items())
            raise UserError(f"verification failed, nothing written: {worst} (--tolerance {args.tolerance:g})")
        if args.quantize:
            scores = gate_scores(probs["fp32"], probs["int8"], labels)
            print_gate(scores, args.min_agreement, args.max_auroc_loss)
            failures = gate_failures(scores, args.min_agreement, args.max_auroc_loss)
            if failures:
                raise UserError(f"int8 gate failed, nothing written: {'; '.join(failures)}")
            stamp_metadata(staged["int8"], {"int8_gate": json.dumps(
                {**scores, "min_agreement": args.min_agreement, "max_auroc_loss": args.max_auroc_loss})})
        for name, path in staged.items():
            os.replace(path, outputs[name])
    for name, path in outputs.items():
        print(f"{name}: {path} ({path.stat().st_size / 1e6:.2f} MB)")
    if args.benchmark:
        table, threads = benchmark(wrapper, {n: p for n, p in outputs.items() if n != "optimized"},
                                   to_nhwc(images[:BIG_BATCH]), (1, BIG_BATCH), args.benchmark_runs)
        print(f"\nmedian latency on this CPU, ms ({threads} thread(s), {args.benchmark_runs} runs)")
        print(f"| {'engine':<20} | {'batch 1':>9} | {'batch 64':>9} | {'b1 speed-up':>11} |")
        print(f"|{'-' * 22}|{'-' * 11}:|{'-' * 11}:|{'-' * 12}:|")
        eager = table["pytorch eager"][1]
        for name, times in table.items():
            print(f"| {name:<20} | {times[1]:>9.2f} | {times[BIG_BATCH]:>9.1f} | {eager / times[1]:>10.1f}x |")


if __name__ == "__main__":
    cli.run(main, get_args_parser())
