"""Grad-CAM heatmaps (the grad-cam package), where their mass falls, and a sanity check.

A heatmap is a float32 (H, W) array in [0, 1] at the input's size, for one target class: the
predicted class unless another is chosen. Attention statistics are the fraction of a map's
total mass inside a region, given as fractions of the height and the width:
- top_third: the top third of the rows (the sky, in landmark photos);
- central: the middle half of the rows and of the columns (a quarter of the area).
A map spread evenly over the image scores each region's area, reported as the uniform baseline.
An all-zero map (no position with positive evidence at that layer) is counted as empty and
left out of the means.

The default method is HiResCAM (Draelos and Carin, "Use HiResCAM instead of Grad-CAM for faithful
explanations of convolutional neural networks", 2020): each position's activations times that
position's own gradient, summed over the channels. Grad-CAM first averages each channel's
gradient over all positions, which matches the network only where the head averages over
positions. fastnet's head takes each channel's maximum and cnn3's reads every position with its
own weight, so a channel's gradient changes from position to position and its average is a poor
weight for the positions where the channel fires. For the landmark target model's
hofburg_imperial_palace predictions at layer2, 77% of the channels got a negative Grad-CAM weight
and 50 of 72 maps were negative at every position, blank after the rectification, while gradient
times activation summed over the map was positive on average (docs/explain.md). HiResCAM keeps each
position's own gradient; it left no confident prediction blank there and passes the sanity
check below.

Sanity check (Adebayo et al., "Sanity Checks for Saliency Maps", 2018): maps of the trained
model should differ from those of the same architecture with re-initialised weights; a mean
correlation near 1 means the map shows the image (edges, brightness), not what was learnt.

An ensemble (lib.models.Ensemble) is explained at its members' layers (target_layers), for the
ensemble's own class score. With several layers pytorch-grad-cam (1.5) makes one map per layer,
rectifies it and scales it to [0, 1] on its own, averages the maps and scales the mean again
(BaseCAM.aggregate_multi_layers): every member counts alike, whatever its share of the gradient.
It pairs the layers' activations (recorded in forward order) with their gradients (recorded as
backward reaches them, assumed to be the reverse order); the members are parallel branches, and
PyTorch's autograd runs the most recently created ready node first, so it finishes the last
member's branch before the one before: the reverse order holds (tests/test_ensemble.py checks
that the maps equal those made one layer at a time). --sanity re-initialises every member.
"""
import contextlib
import io
import math
from dataclasses import dataclass

import numpy as np
import torch

from lib.checkpoint import build_from_checkpoint
from lib.errors import UserError
from lib.inference import predict_probs, to_input
from lib.ensemble import describe
from lib.models import Ensemble, cam_reshape, default_cam_layer

# --method name -> class name in pytorch_grad_cam, which is imported on use: it pulls in OpenCV
# and SciPy, seconds of start-up that a bad flag or checkpoint should not wait for.
METHODS = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "eigencam": "EigenCAM",
           "layercam": "LayerCAM", "scorecam": "ScoreCAM", "hirescam": "HiResCAM", "xgradcam": "XGradCAM"}
# See the module docstring: Grad-CAM's position-averaged gradients left a class blank on models
# whose head does not average over positions (fastnet, cnn3).
DEFAULT_METHOD = "hirescam"
REGIONS = {"top_third": ((0, 1 / 3), (0, 1)), "central": ((1 / 4, 3 / 4), (1 / 4, 3 / 4))}


class ClassLogOdds:
    """The score explained for class c: log(p_c / (1 - p_c)) = z_c - logsumexp(other logits).

    Grad-CAM's usual score is the raw logit z_c, but only differences of logits matter, so a
    model may carry "this is a palace" by lowering the other logit instead; the map of the raw
    logit then comes out empty or inverted (seen with 2-class models). The log-odds is what
    decides the prediction, and unlike p_c it does not saturate for confident predictions.
    """

    def __init__(self, category):
        self.category = category

    def __call__(self, logits):
        others = torch.cat([logits[:self.category], logits[self.category + 1:]])
        return logits[self.category] - torch.logsumexp(others, dim=0)


def resolve_layers(model, names):
    """Modules named like `layer3` or `layer4.1`; a wrong name lists the valid top-level ones."""
    modules = dict(model.named_modules())
    for name in names:
        if not name or name not in modules:  # "" names the whole model, not a layer
            top = ", ".join(child for child, _ in model.named_children())
            raise UserError(f"--layer {name!r}: no such layer; top-level layers are {top} "
                            "(inner ones with dots, e.g. layer4.1)")
    return [modules[name] for name in names]


def target_layers(model, name, layer_names=None):
    """Names of the layers to explain: `layer_names` (--layer) or the default of model `name`
    (lib.models.default_cam_layer); in an Ensemble, those layers of every member, member by member."""
    names = list(layer_names or [default_cam_layer(name)])
    if not isinstance(model, Ensemble):
        return names
    resolve_layers(model.members[0], names)  # a wrong name is reported with a member's layers
    return [f"members.{i}.{layer}" for i in range(len(model.members)) for layer in names]


def class_index(target_class, classes):
    """--target-class as a class name or an index into `classes`; None stays None."""
    if target_class is None:
        return None
    if target_class in classes:
        return classes.index(target_class)
    if target_class.isdigit() and int(target_class) < len(classes):
        return int(target_class)
    listed = ", ".join(f"{i}={name}" for i, name in enumerate(classes))
    raise UserError(f"--target-class {target_class}: not a class name or index ({listed})")


def compute_heatmaps(model, images, mean, std, device, method, layer_names, targets, batch_size=32, reshape=None):
    """Heatmaps (N, H, W) in [0, 1] of uint8 images, each for its class in `targets`.

    reshape: turns the layers' outputs into (N, C, H, W) maps where they are not (lib.models.cam_reshape).
    """
    if method not in METHODS:
        raise UserError(f"--method {method}: choose from {', '.join(METHODS)}")
    layers = resolve_layers(model, layer_names)
    import pytorch_grad_cam

    model.to(device).eval()
    cam = getattr(pytorch_grad_cam, METHODS[method])(model=model, target_layers=layers, reshape_transform=reshape)
    cam.batch_size = batch_size  # ScoreCAM's masked-input batch; the other methods ignore it
    maps = []
    try:
        for start in range(0, len(images), batch_size):
            x = to_input(images[start:start + batch_size].to(device), mean, std)
            chosen = [ClassLogOdds(int(t)) for t in targets[start:start + batch_size]]
            # ScoreCAM draws a progress bar per image; one line per image drowns the summary.
            with contextlib.redirect_stderr(io.StringIO()) if method == "scorecam" else contextlib.nullcontext():
                maps.append(cam(input_tensor=x, targets=chosen))
    except ValueError as error:
        raise UserError(f"--layer {' '.join(layer_names)}: cannot make a heatmap from it, its output "
                        f"must be a (N, C, H, W) feature map ({error})") from None
    finally:
        # Not `with cam:`: the package's __exit__ swallows IndexError, which would hide a bug.
        cam.activations_and_grads.release()
        model.zero_grad(set_to_none=True)
    return np.concatenate(maps).astype(np.float32)


def region_mass(heatmaps, rows, cols):
    """Fraction of each map's mass inside the region (NaN for an all-zero map), and its area fraction."""
    _, h, w = heatmaps.shape
    r0, r1, c0, c1 = round(rows[0] * h), round(rows[1] * h), round(cols[0] * w), round(cols[1] * w)
    total = heatmaps.sum(axis=(1, 2), dtype=np.float64)
    inside = heatmaps[:, r0:r1, c0:c1].sum(axis=(1, 2), dtype=np.float64)
    fraction = np.divide(inside, total, out=np.full_like(total, np.nan), where=total > 0)
    return fraction, (r1 - r0) * (c1 - c0) / (h * w)


def attention_stats(heatmaps):
    """Per-image mass fraction in each of REGIONS, and a summary over the images."""
    per_image, summary = {}, {"images": len(heatmaps)}
    for name, (rows, cols) in REGIONS.items():
        fraction, area = region_mass(heatmaps, rows, cols)
        per_image[name] = fraction
        kept = fraction[~np.isnan(fraction)]
        summary[name] = {"mean": _number(kept.mean()) if len(kept) else None,
                         "std": _number(kept.std()) if len(kept) else None,
                         "median": _number(np.median(kept)) if len(kept) else None,
                         "uniform": area}
    summary["empty_maps"] = int(np.isnan(per_image["top_third"]).sum())
    return per_image, summary


def _number(value):
    return None if value is None or math.isnan(value) else round(float(value), 4)


def _ranks(x):
    """Ranks with ties averaged, so flat zero areas of a map do not invent an order."""
    order = x.argsort(kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    _, group, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(group, weights=ranks) / counts)[group]


def map_correlations(maps_a, maps_b):
    """Per-image Pearson and Spearman correlation of two sets of maps (NaN where a map is flat)."""
    pearson, spearman = [], []
    for a, b in zip(maps_a.reshape(len(maps_a), -1), maps_b.reshape(len(maps_b), -1)):
        flat = a.std() == 0 or b.std() == 0
        pearson.append(np.nan if flat else np.corrcoef(a, b)[0, 1])
        spearman.append(np.nan if flat else np.corrcoef(_ranks(a), _ranks(b))[0, 1])
    return np.array(pearson), np.array(spearman)


def sanity_check(checkpoint, heatmaps, images, targets, method, layer_names, device, seed):
    """Correlation of the trained model's maps with those of a freshly initialised copy."""
    torch.manual_seed(seed)
    random_model = build_from_checkpoint(checkpoint, load_weights=False)
    random_maps = compute_heatmaps(random_model, images, checkpoint["mean"], checkpoint["std"], device,
                                   method, layer_names, targets, reshape=cam_reshape(checkpoint["model"]))
    pearson, spearman = map_correlations(heatmaps, random_maps)
    defined = ~np.isnan(pearson)
    return {"images": len(pearson), "undefined": int((~defined).sum()),
            "pearson_mean": _number(pearson[defined].mean()) if defined.any() else None,
            "spearman_mean": _number(spearman[defined].mean()) if defined.any() else None}


@dataclass
class Explanation:
    """One checkpoint's maps of a set of images, with its predictions and statistics."""
    label: str          # "" alone, "A: " / "B: " side by side
    source: dict        # where the checkpoint came from: path and sha256
    checkpoint: dict
    layers: list
    heatmaps: np.ndarray
    probs: torch.Tensor
    targets: torch.Tensor
    per_image: dict
    summary: dict
    sanity: dict | None


def explain_checkpoint(label, source, checkpoint, model, images, device, method, layer_names, target=None,
                       sanity_seed=None):
    """Predict, explain the predicted (or the given `target`) class, measure, optionally sanity-check."""
    mean, std = checkpoint["mean"], checkpoint["std"]
    probs = predict_probs(model.to(device), images, mean, std, device)
    targets = probs.argmax(1) if target is None else torch.full((len(images),), target)
    heatmaps = compute_heatmaps(model, images, mean, std, device, method, layer_names, targets,
                                reshape=cam_reshape(checkpoint["model"]))
    per_image, summary = attention_stats(heatmaps)
    sanity = None if sanity_seed is None else sanity_check(
        checkpoint, heatmaps, images, targets, method, layer_names, device, sanity_seed)
    return Explanation(label, source, checkpoint, list(layer_names), heatmaps, probs, targets, per_image, summary, sanity)


def stats_record(split, explanations, method):
    """Everything cam_stats.json holds: the setup, per-image numbers and each model's summary."""
    classes = split.classes
    models = []
    for e in explanations:
        per_image = [{"pred": classes[int(e.probs[i].argmax())], "prob": round(float(e.probs[i].max()), 4),
                      "map_of": classes[int(e.targets[i])],
                      **{r: _number(e.per_image[r][i]) for r in REGIONS}} for i in range(len(split))]
        models.append({"label": e.label.rstrip(": "), **e.source, "model": describe(e.checkpoint),
                       "layers": e.layers, "summary": e.summary, "sanity": e.sanity, "images": per_image})
    return {"method": method, "regions": {r: {"rows": rows, "cols": cols} for r, (rows, cols) in REGIONS.items()},
            "images": [{"filename": f, "true": None if split.labels is None else classes[int(split.labels[i])]}
                       for i, f in enumerate(split.filenames)],
            "models": models}


def format_summary(explanation, method):
    s = explanation.summary
    lines = [f"{explanation.label}{describe(explanation.checkpoint)}, {method} at {'+'.join(explanation.layers)}, "
             f"{s['images']} images: mass in top third {_fmt(s['top_third'])}, central {_fmt(s['central'])}"
             + (f"; {s['empty_maps']} empty map(s), no position with positive evidence at this layer"
                if s["empty_maps"] else "")]
    if explanation.sanity:
        c = explanation.sanity
        lines.append(f"  sanity: correlation with a re-initialised copy, Pearson {c['pearson_mean']}, "
                     f"Spearman {c['spearman_mean']} (near 0: the map depends on the learnt weights)")
    return "\n".join(lines)


def _fmt(region):
    if region["mean"] is None:
        return "n/a"
    return f"{region['mean']:.3f} (sd {region['std']:.3f}, uniform {region['uniform']:.3f})"
