"""Unbalanced classes: class weights for the loss, and a sampler that draws every class alike.

--class-weights balanced weighs each image in the loss by n / (n_classes * count of its class),
counted on the train split: scikit-learn's "balanced" class weights
(sklearn.utils.class_weight.compute_class_weight), under which every class adds the same total
weight. --sampler balanced instead draws each epoch's images with probability inverse to their
class's count, with replacement (a rare class's images repeat, a frequent one's are left out),
as many as the split holds, so an epoch has the steps of a shuffled one. Either one keeps the
frequent class from dominating training; together they correct twice.
"""
import math

import numpy as np
import torch
from sklearn.utils.class_weight import compute_class_weight

from lib.errors import UserError

CLASS_WEIGHTS = ("none", "balanced")
SAMPLERS = ("shuffle", "balanced")


def check_choice(class_weights, sampler):
    if class_weights not in CLASS_WEIGHTS:
        raise UserError(f"--class-weights {class_weights}: choose {' or '.join(CLASS_WEIGHTS)}")
    if sampler not in SAMPLERS:
        raise UserError(f"--sampler {sampler}: choose {' or '.join(SAMPLERS)}")


def class_weights(labels, num_classes):
    """float32 (num_classes,): n / (num_classes * count) per class of int labels (N,).

    Every class must have images (lib.engine.check_splits makes sure); scikit-learn raises
    ValueError otherwise."""
    weights = compute_class_weight("balanced", classes=np.arange(num_classes), y=np.asarray(labels))
    return torch.tensor(weights, dtype=torch.float32)


def balanced_order(labels, seed, epoch, num_replicas=1, rank=0):
    """This process's image indices for one epoch of --sampler balanced: int64 (ceil(N / num_replicas),).

    Every process draws the same ceil(N / num_replicas) * num_replicas indices of the int labels
    (N,), each image with probability 1 / (n_classes * count of its class), from a generator
    seeded by seed + epoch (as torch's DistributedSampler seeds its shuffle), and keeps every
    num_replicas-th one from its rank on: the same number of batches on every process, a share
    of its own, drawn anew each epoch, and a resumed run draws what an uninterrupted one did.
    PyTorch's WeightedRandomSampler has no distributed form (pytorch #77154, #23430).
    """
    labels = torch.as_tensor(labels)
    probability = 1.0 / torch.bincount(labels)[labels].double()
    total = math.ceil(len(labels) / num_replicas) * num_replicas
    generator = torch.Generator().manual_seed(seed + epoch)
    return torch.multinomial(probability, total, replacement=True, generator=generator)[rank::num_replicas]
