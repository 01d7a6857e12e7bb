"""Classify image files with an exported ONNX model: onnxruntime, numpy and pillow, no PyTorch.

Example: python predict.py runs/target/model.onnx photo.jpg more_photos/ --top-k 2
Class names and image size come from the model's metadata; each image is resized as in
training. Prints one line per image (file, then label and probability, best first) or --json.
Folders are searched recursively for image files.
"""
import json
from pathlib import Path

from lib import cli
from lib.edge import OnnxClassifier
from lib.errors import UserError
from lib.images import IMAGE_SUFFIXES

BATCH = 64


def get_args_parser():
    parser = cli.make_parser(__doc__)
    parser.add_argument("model", help="an .onnx model written by export.py")
    parser.add_argument("inputs", nargs="+", help="image files or folders of images")
    parser.add_argument("--top-k", type=cli.positive_int, default=1, help="how many classes to show per image")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of lines")
    return parser


def image_paths(inputs):
    paths = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError(f"{path}: no image files in this folder")
            paths += found
        elif path.is_file():
            paths.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    return paths


def main(args):
    classifier = OnnxClassifier(args.model)
    top_k = min(args.top_k, len(classifier.classes))
    results = []
    paths = image_paths(args.inputs)
    for start in range(0, len(paths), BATCH):
        chunk = paths[start:start + BATCH]
        probs = classifier.predict_proba(classifier.load_images(chunk))
        for path, row in zip(chunk, probs):
            best = row.argsort()[::-1][:top_k]
            results.append({"file": str(path), "predictions": [
                {"label": classifier.classes[i], "probability": float(row[i])} for i in best]})
            if not args.json:
                print("\t".join([str(path)] + [f"{p['label']}\t{p['probability']:.4f}"
                                               for p in results[-1]["predictions"]]), flush=True)
    if args.json:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    cli.run(main, get_args_parser())
