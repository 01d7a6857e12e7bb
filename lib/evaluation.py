"""Evaluation: probabilities from a model file, then a report that does not care where they came from.

load_predictor gives one interface over a PyTorch checkpoint and an exported .onnx model:
.preprocessing (the model's lib.preprocessing record: classes, image size, resize policy, ...),
.task (None when the file does not say) and .predict(images, tta) -> numpy (N, C) probabilities
for uint8 (N, 3, H, W) images. Test-time augmentation (tta) averages the image and its
horizontal mirror. Everything after that is numpy arithmetic on labels and probabilities
(lib.metrics), identical for both kinds of model.

Each predictor imports what only it needs when it is made: an .onnx model needs neither
torchvision (whose import pulls in torch._dynamo, seconds) nor lib.inference; neither needs the
training loop.
"""
from pathlib import Path

import numpy as np

from lib.errors import UserError
from lib.files import write_csv
from lib.metrics import bootstrap_ci, full_report

N_RESAMPLES = 1000


class TorchPredictor:
    def __init__(self, path, device):
        from lib.checkpoint import build_from_checkpoint, load_checkpoint, read_preprocessing

        checkpoint = load_checkpoint(path)
        self.model = build_from_checkpoint(checkpoint, where=f"--checkpoint {path}").to(device)
        self.preprocessing = read_preprocessing(checkpoint, where=f"--checkpoint {path}")
        self.task = checkpoint.get("task")
        self.device = device

    def predict(self, images, tta=False):
        from lib.inference import predict_probs

        return predict_probs(self.model, images, self.preprocessing.mean, self.preprocessing.std, self.device,
                             tta=tta).numpy()


class OnnxPredictor:
    def __init__(self, path):
        try:
            from lib.edge import OnnxClassifier
        except ModuleNotFoundError as error:
            raise UserError(f"--checkpoint {path}: cannot read .onnx models here ({error})") from None
        self.session = OnnxClassifier(path)
        self.preprocessing = self.session.preprocessing
        self.task = None

    def predict(self, images, tta=False, batch_size=256):
        """In batches, so that only a batch of the split is ever copied to the model's NHWC layout."""
        out = [np.empty((0, len(self.preprocessing.classes)))]
        for start in range(0, len(images), batch_size):
            pixels = images[start:start + batch_size].permute(0, 2, 3, 1).contiguous().numpy()
            probs = self.session.predict_proba(pixels)
            if tta:
                probs = (probs + self.session.predict_proba(np.ascontiguousarray(pixels[:, :, ::-1]))) / 2
            out.append(np.asarray(probs, dtype=np.float64))
        return np.concatenate(out)


def load_predictor(path, device):
    """A PyTorch checkpoint, or an exported model when the name ends in .onnx."""
    if str(path).lower().endswith(".onnx"):
        if not Path(path).is_file():
            raise UserError(f"--checkpoint {path}: no such file")
        return OnnxPredictor(path)
    return TorchPredictor(path, device)


def build_report(labels, probs, classes, seed=0, n_resamples=N_RESAMPLES):
    """full_report plus 95% percentile-bootstrap intervals for accuracy and AUROC, and how many
    resamples the AUROC interval rests on (those holding every class of the split)."""
    report = full_report(labels, probs, classes)
    intervals = bootstrap_ci(labels, probs, n_resamples=n_resamples, seed=seed, level=0.95)
    report["ci95"] = {"accuracy": intervals["accuracy"], "auroc": intervals["auroc"]}
    report["bootstrap"] = {"n_resamples": n_resamples, "n_resamples_auroc": intervals["n_resamples_auroc"],
                           "seed": seed}
    return report


def format_report(report):
    lo, hi = report["ci95"]["accuracy"]
    boot = report["bootstrap"]
    if report["ci95"]["auroc"] is None:
        auroc_ci = f"no 95% CI: none of {boot['n_resamples']} resamples held every class"
    else:
        a_lo, a_hi = report["ci95"]["auroc"]
        auroc_ci = f"95% CI {a_lo:.4f}-{a_hi:.4f}, {boot['n_resamples_auroc']} of {boot['n_resamples']} resamples"
    lines = [f"images            {report['n_images']}",
             f"accuracy          {report['accuracy']:.4f}  (95% CI {lo:.4f}-{hi:.4f}, {boot['n_resamples']} resamples)",
             f"AUROC             {report['auroc']:.4f}  ({auroc_ci})" if report["auroc"] is not None else
             "AUROC             -",
             f"  estimator       {report['auroc_estimator']}",
             f"balanced accuracy {report['balanced_accuracy']:.4f}",
             f"loss              {report['loss']:.4f}"]
    if "auroc_ovo" in report:
        lines.append(f"AUROC one-vs-one  {report['auroc_ovo']:.4f}")
    width = max(len(name) for name in report["per_class"])
    lines.append(f"{'class':<{width}}  precision  recall     f1  support")
    for name, row in report["per_class"].items():
        lines.append(f"{name:<{width}}  {row['precision']:9.3f}  {row['recall']:6.3f}  {row['f1']:5.3f}  "
                     f"{row['support']:7d}")
    return "\n".join(lines)


def write_predictions(path, filenames, probs, classes, labels=None):
    """filename, true label (empty when unknown), predicted label, one probability per class."""
    predicted = probs.argmax(1)
    rows = [{"filename": name, "true_label": classes[labels[i]] if labels is not None else "",
             "predicted_label": classes[predicted[i]],
             **{f"prob_{c}": f"{p:.6f}" for c, p in zip(classes, probs[i])}}
            for i, name in enumerate(filenames)]
    write_csv(rows, path, ["filename", "true_label", "predicted_label", *[f"prob_{c}" for c in classes]])
