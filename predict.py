"""Classify image files with an exported ONNX model: onnxruntime, numpy and pillow, no PyTorch.

Example: python predict.py runs/target/model.onnx photo.jpg more_photos/ --top-k 2
         python predict.py --benchmark runs/target/model.int8.onnx --json
Class names, image size and resize policy come from the model's metadata; each image is turned
upright as its EXIF orientation says and made square as in training (lib.images). Prints one line
per image (file, then label and probability, best first) or --json. Folders are searched
recursively for files with an extension Pillow reads (the others are counted in a warning;
hidden files and folders, such as .ipynb_checkpoints/, are left out).
An unreadable image stops the run with one line naming it, unless --skip-bad-images (then a
warning, and with --json an entry {"file", "error"} in its place).
A model needing a newer onnxruntime than the installed one (its min_onnxruntime) is refused.
--benchmark times the model instead: file size, session creation, first run, p50/p95 latency.
"""
import json
import sys
from pathlib import Path

import numpy as np

from lib import cli
from lib.benchmark import benchmark_model, format_benchmark
from lib.edge import CPU, OnnxClassifier
from lib.errors import UserError
from lib.images import DEFAULT_MAX_PIXELS, BadImageError, is_image_name

BATCH = 64


def get_args_parser():
    parser = cli.make_parser(__doc__)
    parser.add_argument("model", help="an .onnx model written by export.py")
    parser.add_argument("inputs", nargs="*", help="image files or folders of images")
    parser.add_argument("--top-k", type=cli.positive_int, default=1, help="how many classes to show per image")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="warn about unreadable images and go on (with --json: an error entry per file)")
    cli.add_max_pixels_arg(parser, DEFAULT_MAX_PIXELS)
    parser.add_argument("--provider", default=CPU,
                        help="onnxruntime execution provider (CPU runs what it cannot); a wrong name "
                             "lists the installed ones")
    parser.add_argument("--threads", type=cli.non_negative_int, default=0,
                        help="threads onnxruntime may use (0: its own choice, one per physical core)")
    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--benchmark", action="store_true",
                       help="time the model (no images needed) at 1, 2 and all threads; ignores --threads")
    bench.add_argument("--benchmark-batch", type=cli.positive_int, default=BATCH,
                       help="the larger batch size timed besides batch 1")
    bench.add_argument("--benchmark-runs", type=cli.positive_int, default=30, help="timed runs per figure")
    return parser


def image_paths(inputs):
    """The files named, and the image files in the folders named (recursively; hidden files and
    everything in hidden folders left out)."""
    paths, other = [], 0
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path)))
            found = [p for p in files if is_image_name(p)]
            other += len(files) - len(found)
            if not found:
                raise UserError(f"{path}: no image files in this folder")
            paths += found
        elif path.is_file():
            paths.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    if other:
        print(f"warning: skipped {other} file(s) whose extension Pillow does not read", file=sys.stderr)
    return paths


def _hidden(relative):
    """Inside a hidden folder (.ipynb_checkpoints/, .git/) or hidden itself, as the ImageFolder loader skips."""
    return any(part.startswith(".") for part in relative.parts)


def decode_batch(classifier, paths, max_pixels, skip_bad_images):
    """(decoded pixels, their paths, {path: error}) of one batch; without skip_bad_images the first
    unreadable file is an error."""
    pixels, good, errors = [], [], {}
    for path in paths:
        try:
            pixels.append(classifier.decode(path, max_pixels))
            good.append(path)
        except BadImageError as error:
            if not skip_bad_images:
                raise
            errors[path] = str(error)
            print(f"warning: skipped {error}", file=sys.stderr)
    return pixels, good, errors


def main(args):
    if args.benchmark:
        if args.inputs:
            raise UserError("--benchmark times the model alone: give no image files")
        report = benchmark_model(args.model, args.provider, (1, args.benchmark_batch), args.benchmark_runs)
        print(json.dumps(report, indent=1) if args.json else format_benchmark(report))
        return
    if not args.inputs:
        raise UserError("no images: give image files or folders (or --benchmark to time the model)")
    paths = image_paths(args.inputs)
    classifier = OnnxClassifier(args.model, args.provider, args.threads)
    classifier.warm_up()
    top_k = min(args.top_k, len(classifier.preprocessing.classes))
    results, failed = [], 0
    for start in range(0, len(paths), BATCH):
        chunk = paths[start:start + BATCH]
        pixels, good, errors = decode_batch(classifier, chunk, args.max_image_pixels, args.skip_bad_images)
        failed += len(errors)
        probs = dict(zip(good, classifier.predict_proba(np.stack(pixels)))) if pixels else {}
        for path in chunk:
            if path in errors:
                results.append({"file": str(path), "error": errors[path]})
                continue
            best = probs[path].argsort()[::-1][:top_k]
            results.append({"file": str(path), "predictions": [
                {"label": classifier.preprocessing.classes[i], "probability": float(probs[path][i])} for i in best]})
            if not args.json:
                print("\t".join([str(path)] + [f"{p['label']}\t{p['probability']:.4f}"
                                               for p in results[-1]["predictions"]]), flush=True)
    if failed == len(paths):
        raise UserError(f"no readable images among {len(paths)} file(s)")
    if args.json:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    cli.run(main, get_args_parser())
