"""MixUp and CutMix from torchvision.transforms.v2, on whole training batches, seeded per step.

v2.MixUp (Zhang et al. 2018) blends every image of a batch with the next one, by one
lambda ~ Beta(alpha, alpha) per batch; v2.CutMix (Yun et al. 2019) pastes a box of the next
image, lambda being the area left. Both return soft targets, float (N, C): the same mixture of
the two images' one-hot labels. With both, each batch gets one of them, chosen at random, as
torchvision's reference training script does (v2.RandomChoice).

v2 draws its random numbers from torch's global generator. Each step's draw here runs under
torch.random.fork_rng with the CPU generator seeded by (seed, epoch, step, rank), so a resumed
run mixes exactly as an uninterrupted one did, and no other random stream moves.
"""
import numpy as np
import torch
from torchvision.transforms import v2


def make_mixer(mixup, cutmix, num_classes):
    """The batch transform of --mixup and --cutmix (each an alpha; 0 is off), or None when both are off."""
    mixers = [mixer(alpha=alpha, num_classes=num_classes)
              for mixer, alpha in ((v2.MixUp, mixup), (v2.CutMix, cutmix)) if alpha]
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


def step_seed(seed, epoch, step, rank):
    """The seed of one step's mixing: a function of where the step is, not of what ran before."""
    return int(np.random.SeedSequence([seed % 2**64, epoch, step, rank]).generate_state(1, np.uint64)[0])


def mix(mixer, images, labels, seed):
    """Float images (N, 3, H, W) and int64 labels (N,) -> (mixed images, soft targets float32 (N, C)).

    The same seed gives the same mixture; torch's global random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return mixer(images, labels)
