"""The gate an int8 model must pass before it is written: does quantization cost accuracy
beyond what the verification images can resolve?

A top-1 agreement threshold alone measures noise: an image the float model scores near p = 0.5
changes side under any small perturbation, and on 140 images two such flips are 0.986 agreement
though the int8 model is neither better nor worse. So the gate judges, on the same images:
- agreement on the images the float model is confident about (its top probability at least
  `confident_above`): int8 rounding moves a probability by a few hundredths, so one of these
  changing class means the int8 model is broken, not borderline. Raw agreement (all images)
  and the largest probability difference are reported beside it, not judged;
- with labels, the accuracy change by McNemar's exact test on the discordant images (exact at
  any count; a bootstrap interval of a handful of discordant images is not), and the AUROC
  change with a paired bootstrap interval (lib.metrics). Either fails the gate only when
  the int8 model is worse by more than its allowed loss AND beyond noise at `level` (two-sided:
  McNemar's p below 1 - level, the bootstrap interval of the loss above zero).
Unlabelled images (--synthetic-verify, an unlabelled split) give agreement only; when none of
them is confident either, there is nothing to judge on and the gate refuses.
"""
from dataclasses import asdict, dataclass

import numpy as np

from lib.metrics import mcnemar_exact, paired_auroc_difference


@dataclass(frozen=True)
class Gate:
    """The gate's thresholds (export.py's flags, whose defaults these are); judge() applies them."""
    min_confident_agreement: float = 0.99
    confident_above: float = 0.8     # float model's top probability
    max_accuracy_loss: float = 0.01  # float minus int8
    max_auroc_loss: float = 0.005
    level: float = 0.95              # of McNemar's test and the bootstrap interval
    n_resamples: int = 1000
    seed: int = 0

    def judge(self, float_probs, int8_probs, labels=None):
        """The gate's figures for (N, C) probabilities of the float and int8 models on the same
        images, labels (N,) or None; a dict with every figure, the thresholds (under
        "thresholds"), "failures" (text naming the option behind each) and "passed"."""
        float_top, int8_top = float_probs.argmax(1), int8_probs.argmax(1)
        agree = float_top == int8_top
        confident = float_probs.max(1) >= self.confident_above
        figures = {"images": len(agree), "agreement": float(agree.mean()),
                   "max_abs_diff": float(np.abs(float_probs - int8_probs).max()),
                   "confident_images": int(confident.sum()),
                   "confident_agreement": float(agree[confident].mean()) if confident.any() else None,
                   "labelled": labels is not None}
        failures = []
        if figures["confident_agreement"] is not None and figures["confident_agreement"] < self.min_confident_agreement:
            failures.append(f"agreement {figures['confident_agreement']:.4f} on the {confident.sum()} confident "
                            f"images < {self.min_confident_agreement:g} (--min-confident-agreement)")
        if labels is None:
            if not confident.any():
                failures.append(f"nothing to judge on: unlabelled images, none with float confidence >= "
                                f"{self.confident_above:g} (--confident-above)")
        else:
            labelled, more = self._judge_labelled(float_top, int8_top, float_probs, int8_probs, np.asarray(labels))
            figures.update(labelled)
            failures += more
        return {**figures, "thresholds": asdict(self), "failures": failures, "passed": not failures}

    def _judge_labelled(self, float_top, int8_top, float_probs, int8_probs, labels):
        """(figures, failures) of the accuracy and AUROC tests."""
        float_right, int8_right = float_top == labels, int8_top == labels
        only_float, only_int8 = int((float_right & ~int8_right).sum()), int((~float_right & int8_right).sum())
        figures = {"accuracy_fp32": float(float_right.mean()), "accuracy_int8": float(int8_right.mean()),
                   "accuracy_loss": (only_float - only_int8) / len(labels),
                   "only_fp32_right": only_float, "only_int8_right": only_int8,
                   "mcnemar_p": mcnemar_exact(only_float, only_int8)}
        failures = []
        if figures["accuracy_loss"] > self.max_accuracy_loss and figures["mcnemar_p"] < 1 - self.level:
            failures.append(f"accuracy loss {figures['accuracy_loss']:.4f} > {self.max_accuracy_loss:g} "
                            f"(--max-accuracy-loss), beyond noise (McNemar p {figures['mcnemar_p']:.3g})")
        if len(np.unique(labels)) < 2:
            return figures, failures
        change = paired_auroc_difference(labels, float_probs, int8_probs, self.n_resamples, self.seed, self.level)
        figures.update(auroc_fp32=change["auroc_a"], auroc_int8=change["auroc_b"], auroc_loss=change["difference"],
                       auroc_loss_interval=change["interval"], auroc_resamples_used=change["n_resamples_used"])
        low = change["interval"][0] if change["interval"] else 0.0
        if change["difference"] > self.max_auroc_loss and low > 0:
            failures.append(f"AUROC loss {change['difference']:.4f} > {self.max_auroc_loss:g} (--max-auroc-loss), "
                            f"beyond noise ({self.level:.0%} interval from {low:+.4f})")
        return figures, failures


def describe(verdict):
    """The verdict as lines for people: each figure beside the rule it is judged by."""
    t = verdict["thresholds"]
    confident = ("none of the images" if verdict["confident_agreement"] is None else
                 f"{verdict['confident_agreement']:.4f} on the {verdict['confident_images']} images")
    lines = [f"agreement with fp32: {confident} fp32 gives a top probability >= {t['confident_above']:g} "
             f"(fails below {t['min_confident_agreement']:g}); {verdict['agreement']:.4f} on all "
             f"{verdict['images']}, max |dp| {verdict['max_abs_diff']:.3g}"]
    if not verdict["labelled"]:
        return lines + ["unlabelled images: the gate judges agreement only"]
    lines.append(f"accuracy {verdict['accuracy_fp32']:.4f} -> {verdict['accuracy_int8']:.4f}, loss "
                 f"{verdict['accuracy_loss']:+.4f}: {verdict['only_fp32_right']} image(s) only fp32 gets right, "
                 f"{verdict['only_int8_right']} only int8, McNemar p {verdict['mcnemar_p']:.3g} "
                 f"(fails if loss > {t['max_accuracy_loss']:g} and p < {1 - t['level']:.2g})")
    if "auroc_loss" in verdict:
        interval = verdict["auroc_loss_interval"]
        spread = f"{interval[0]:+.4f} to {interval[1]:+.4f}" if interval else "none (too few images)"
        lines.append(f"AUROC {verdict['auroc_fp32']:.4f} -> {verdict['auroc_int8']:.4f}, loss "
                     f"{verdict['auroc_loss']:+.4f}, {t['level']:.0%} paired bootstrap interval {spread} "
                     f"(fails if loss > {t['max_auroc_loss']:g} and the interval is above 0)")
    return lines
