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
import sys

from lib import cli, flags
from lib.benchmark import compare_engines, engines_table
from lib.data import SPLITS
from lib.export_set import BIG_BATCH, Int8Plan, eager_runner, export_checkpoint
from lib.int8_gate import Gate
from lib.onnx_export import DEFAULT_OPSET, RUNTIME_FOR_OPSET
from lib.quantize import CALIBRATION_METHODS, DEFAULT_TARGET, TARGETS

INT8_REFUSED = 3
EXIT_CODES = f"""exit codes:
  0    every model asked for is verified and written
  2    bad input (file, flag, data), or the fp32 model failed verification: nothing written
  {INT8_REFUSED}    the fp32 model (and --optimize's) is verified and written, but the int8 gate refused
       every recipe: no .int8.onnx (an earlier one at that path is removed)
  130  interrupted (Ctrl-C)
"""


def get_args_parser():
    parser = cli.make_parser(__doc__, epilog=EXIT_CODES)
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
    int8 = Int8Plan(args.target, args.calibration_method, args.calibration_images,
                    Gate(args.min_confident_agreement, args.confident_above, args.max_accuracy_loss,
                         args.max_auroc_loss, args.gate_level, seed=args.seed)) if args.quantize else None
    result = export_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite, raw_logits=args.raw_logits,
                               opset=args.opset, verify_data=args.verify_data, verify_split=args.verify_split,
                               synthetic_verify=args.synthetic_verify, tolerance=args.tolerance,
                               loading=cli.load_options(args), optimize=args.optimize, int8=int8, seed=args.seed)
    print("\n".join(result.lines()))
    if args.benchmark:
        models = {name: result.outputs[name] for name in result.written if name != "optimized"}
        run, threads = eager_runner(result.wrapper)
        table = compare_engines(run, threads, models, result.pixels[:BIG_BATCH], (1, BIG_BATCH), args.benchmark_runs)
        print(engines_table(table, threads, args.benchmark_runs, BIG_BATCH))
    if result.int8_refused:
        earlier = result.outputs["int8"]
        removed = f" (the earlier one at {earlier} is removed)" if earlier in result.removed else ""
        print(f"export.py: warning: the int8 gate refused all {len(result.int8_attempts)} recipes for --target "
              f"{args.target}: no int8 model{removed}; the verified fp32 model is written: {result.outputs['fp32']}",
              file=sys.stderr)
        return INT8_REFUSED
    return 0


if __name__ == "__main__":
    cli.run(main, get_args_parser())
