"""The training loss: cross-entropy of soft targets, with class weights and label smoothing, on one scale.

Targets are probabilities (N, C): one-hot labels, or the mixtures MixUp and CutMix make.
PyTorch's cross_entropy with class weights w averages integer targets as
sum_i w_{y_i} l_i / sum_i w_{y_i}, but probability targets as sum_i sum_c w_c t_ic l_ic / N
(pytorch #107680, #104776): the same labels given as one-hot rows get another scale, and a mixed
batch's loss would move with its weights. Here every batch is
sum_i sum_c w_c t'_ic l_ic / sum_i sum_c w_c t_ic, t' the smoothed targets: for one-hot rows
exactly PyTorch's integer-target loss, for mixtures its soft analogue. Label smoothing is applied
here, once (v2.MixUp and v2.CutMix do not smooth).
"""
import torch.nn.functional as F


def cross_entropy(logits, targets, class_weights=None, label_smoothing=0.0):
    """Mean loss (a scalar) of logits (N, C) against probability targets (N, C).

    class_weights: float (C,) or None (every class 1)."""
    if class_weights is None:
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    total = F.cross_entropy(logits, targets, weight=class_weights, label_smoothing=label_smoothing, reduction="sum")
    return total / (targets @ class_weights).sum()
