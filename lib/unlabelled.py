"""Learning from unlabelled photos: FixMatch (Sohn et al. 2020, "FixMatch: Simplifying
Semi-Supervised Learning with Consistency and Confidence") as an extra batch of each training step.

Each step also takes as many unlabelled photos as labelled ones, each augmented twice: a weak
view (the `light` preset: flip and a mild crop) and a strong view (the `strong` preset: crop,
rotation, colour, grayscale, erasing). Where the network's top probability on the weak view
reaches --threshold, that class is a pseudo-label which the strong view learns (cross-entropy,
times --unlabelled-weight, averaged over all the unlabelled photos of the step, as in the paper);
the others add nothing. The labelled batch and both views go through the network in one forward
pass, so BatchNorm normalises them as one batch (the paper's choice). The share of unlabelled
photos above the threshold is each epoch's `unlabelled_used` (metrics.csv, the checkpoints'
history and metrics, the epoch's log line).

The photos are the CSV layout's `challenge` partition (or an ImageFolder's challenge/ folder) of
the --data datasets, or any folder of photos (lib.data.load_photo_folder); they are a Split
without labels, decoded and cached like any split.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lib import distributed
from lib.augment import augment_batch
from lib.checkpoint import data_location
from lib.data import Split, load_datasets, load_photo_folder

CHALLENGE = "challenge"
WEAK, STRONG = "light", "strong"


def load_unlabelled(value, datasets, task, image_size, resize, **options):
    """The unlabelled photos --unlabelled names, as a Split with labels None, or None without the flag.

    value: 'challenge' (that partition of each --data dataset) or a folder of photos; options:
    lib.data.load_split's keyword arguments. Raises UserError for a folder without images."""
    if value is None:
        return None
    if value == CHALLENGE:
        split = load_datasets(datasets, CHALLENGE, task, image_size, resize=resize, **options)
    else:
        split = load_photo_folder(value, image_size, resize=resize, **options)
    return Split(split.images, None, split.classes, split.filenames, split.mean, split.std)


def setup(value, datasets, task, image_size, resize, config, **options):
    """The FixMatch part of a run that --unlabelled asks for (None without it), with the checkpoint's
    `unlabelled` entry (.entry: where the photos came from, how many, weight and threshold).
    Arguments: load_unlabelled's; config: the TrainConfig (unlabelled_weight, threshold)."""
    split = load_unlabelled(value, datasets, task, image_size, resize, **options)
    if split is None:
        return None
    where = data_location(datasets) if value == CHALLENGE else data_location(value)
    entry = {"photos": value, "data": where, "images": len(split), "threshold": config.threshold,
             "weight": config.unlabelled_weight, "weak": WEAK, "strong": STRONG}
    return FixMatch(split, config.unlabelled_weight, config.threshold, entry)


def pseudo_label_loss(logits_weak, logits_strong, threshold):
    """FixMatch's unlabelled loss and how many photos it used.

    logits_weak, logits_strong: (B, C) for the weak and strong view of the same B photos.
    Returns (the mean over all B of the strong view's cross-entropy with the weak view's argmax,
    counted where its softmax probability is >= threshold; a scalar tensor, differentiable through
    logits_strong only), and the number of photos counted (int)."""
    confidence, pseudo = F.softmax(logits_weak.detach().float(), dim=1).max(1)
    used = confidence >= threshold
    loss = F.cross_entropy(logits_strong.float(), pseudo, reduction="none") * used
    return loss.mean(), int(used.sum())


@dataclass
class FixMatch:
    """The unlabelled part of each step for lib.engine's loop: views to append to the labelled batch,
    the loss on their logits, and the share of photos used in the epoch."""
    split: Split
    weight: float
    threshold: float
    entry: dict        # the checkpoint's `unlabelled` entry (setup)
    used: int = 0
    seen: int = 0

    def views(self, seed, epoch, step, count, size, generator):
        """(weak, strong) float views (count, 3, size, size) in [0, 1] of this step's photos.

        The photos follow a permutation of the split drawn from (seed, epoch, process), walked
        `count` at a time and wrapping around, so a resumed run repeats an uninterrupted one."""
        order = torch.randperm(len(self.split), generator=torch.Generator().manual_seed(
            (seed * 1_000_003 + epoch) * 1_009 + distributed.rank()))
        rows = order[(step * count + torch.arange(count)) % len(order)]
        images = self.split.images[rows]
        return augment_batch(images, WEAK, generator, size), augment_batch(images, STRONG, generator, size)

    def loss(self, logits):
        """The weighted unlabelled loss of the views' logits (2B, C: weak rows, then strong); counts what it used."""
        weak, strong = logits.chunk(2)
        loss, used = pseudo_label_loss(weak, strong, self.threshold)
        self.used, self.seen = self.used + used, self.seen + len(weak)
        return self.weight * loss

    def summary(self):
        return (f"unlabelled: {len(self.split)} photos ({self.entry['photos']}), pseudo-labels from probability "
                f"{self.threshold} up, weight {self.weight}")

    def start_epoch(self):
        self.used = self.seen = 0

    def share_used(self):
        """The share of this epoch's unlabelled photos (all processes) whose pseudo-label counted."""
        used, seen = distributed.gather_all(torch.tensor([[self.used, self.seen]])).sum(0).tolist()
        return used / seen if seen else 0.0
