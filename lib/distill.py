"""Knowledge distillation: a teacher checkpoint's probabilities become the training targets.

The teacher (any checkpoint of the same classes; typically an ensemble, lib.ensemble, whose
inference costs several models) reads the very augmented batch the student learns from, so the
student matches the teacher's function on every view it sees, not fixed per-image targets: Beyer
et al. 2022, "Knowledge distillation: A good teacher is patient and consistent" (consistent
teaching). Each image's target is (1 - weight) x its label + weight x the teacher's probabilities
(Hinton et al. 2015, "Distilling the Knowledge in a Neural Network", at temperature 1), then
lib.loss's cross-entropy as for any soft target. The teacher runs in eval mode in float32 and
never trains.
"""
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lib.checkpoint import build_from_checkpoint, file_hash, load_checkpoint, read_preprocessing
from lib.ensemble import in_class_order, is_ensemble
from lib.errors import UserError
from lib.flops import inference_flops
from lib.inference import normalize, resize


@dataclass
class Teacher:
    """The teacher of a run: `targets` of each augmented batch, its forward cost, the checkpoint's entry."""
    network: torch.nn.Module   # eval mode, on the run's device
    mean: tuple
    std: tuple
    image_size: int
    weight: float
    flops_per_image: float     # forward, at image_size (lib.flops)
    entry: dict                # the student checkpoint's `teacher` entry (load_teacher)

    @torch.no_grad()
    def targets(self, images, labels):
        """Soft targets (N, C) for float images (N, 3, H, W) in [0, 1] (the augmented batch, before
        normalisation) and their label targets (N, C): the blend with the teacher's probabilities.
        A batch at another side than the teacher's (progressive resizing) is resized to its side."""
        x = normalize(resize(images, self.image_size), self.mean, self.std)
        probs = F.softmax(self.network(x).float(), dim=1)
        return (1 - self.weight) * labels + self.weight * probs

    def summary(self):
        members = self.entry.get("members")
        what = f"an ensemble of {members}" if members else "one model"
        targets = ("its probabilities" if self.weight == 1
                   else f"{1 - self.weight:g} x the label + {self.weight:g} x its probabilities")
        return (f"teacher: {self.entry['checkpoint']} ({what}, {self.flops_per_image / 1e9:.3f} GFLOP per image); "
                f"targets: {targets}")


def load_teacher(path, weight, classes, resize, device):
    """The Teacher of --teacher `path` (None when path is None), its outputs in the order of `classes`.

    weight: --teacher-weight, in [0, 1]; classes: the student's class names; resize: the student's
    resize policy (the teacher must read images framed the same way). Raises UserError, naming
    --teacher, for a checkpoint that does not load, other class names, or another resize policy."""
    if path is None:
        return None
    where = f"--teacher {path}"
    checkpoint = load_checkpoint(path)
    facts = read_preprocessing(checkpoint, where=where)
    if facts.resize != resize:
        raise UserError(f"{where}: it reads images with --resize {facts.resize}, this run with {resize}; "
                        f"a teacher must see images framed as the student does")
    checkpoint = in_class_order(checkpoint, classes, where, ("this run's data", "the teacher"))
    network = build_from_checkpoint(checkpoint, where=where).to(device)
    members = len(checkpoint["ensemble"]["members"]) if is_ensemble(checkpoint) else None
    entry = {"checkpoint": str(Path(path).resolve()), "sha256": file_hash(path), "weight": weight,
             "model": facts.model, "members": members, "image_size": facts.image_size}
    return Teacher(network, tuple(facts.mean), tuple(facts.std), facts.image_size, weight,
                   inference_flops(network, facts.image_size), entry)
