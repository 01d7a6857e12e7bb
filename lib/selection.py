"""Checkpoint selection: which epoch a run recommends, and when it may stop early.

- best.pt is the best validated epoch by --select-metric (balanced_accuracy by default, the mean
  recall over classes: a frequent class cannot dominate it, and on a balanced val split it equals
  accuracy; or accuracy, auroc, loss; ties broken by the others: accuracy, then AUROC, then lower
  loss).
- OUT/model.pt is the checkpoint the run recommends: best.pt's epoch with --select best, the
  last epoch with --select last (what a long schedule ends on once its learning rate has
  annealed: on a small val split, "best" is decided by one or two images).
- Early stopping ends a run after --patience epochs (counted in epochs, whatever
  --eval-every is) without a better validation score, but only once the learning rate has
  fallen to at most STOP_BELOW_PEAK of its peak, or will fall no further: a small val split
  would otherwise end a schedule while its learning rate is still high, before the annealing
  that gives the best weights.

The same Selector decides online (lib.engine.fit) and afterwards, replayed over a saved
history (replay, used by crossval.py to score several rules from one training run per fold):
the weights of epoch e do not depend on whether training would have stopped later.
"""
import numpy as np

from lib.errors import UserError
from lib.metrics import auroc, balanced_accuracy, log_loss
from lib.recipe import config_lr_factor

SELECTS = ("best", "last")
# +1: higher is better. The order is the tie-break order after the chosen metric.
METRICS = {"accuracy": 1, "auroc": 1, "loss": -1, "balanced_accuracy": 1}
# Mean recall over classes, and AUROC (of class 1, or the mean of each class's one-vs-rest): the
# metrics that a frequent class cannot dominate. The others average over images.
CLASS_BALANCED = ("balanced_accuracy", "auroc")
STOP_BELOW_PEAK = 0.25
# A val split whose largest class has more than this many times the images of its smallest is
# "unbalanced": accuracy then ranks epochs mostly by the large classes.
UNBALANCED_RATIO = 1.5
N_RESAMPLES = 200  # paired bootstrap of the note on ranking (AUROC is computed per resample)


def check_choice(select, metric):
    if select not in SELECTS:
        raise UserError(f"--select {select}: choose {' or '.join(SELECTS)}")
    if metric not in METRICS:
        raise UserError(f"--select-metric {metric}: choose {', '.join(METRICS)}")


def score(row, metric):
    """The sort key of a validated history row: higher is better.

    Rounded to 12 digits: on a balanced val split balanced accuracy equals accuracy, but sums
    in another order, and a last-bit difference must not decide a tie the next metric breaks."""
    order = [metric] + [m for m in METRICS if m != metric]
    return tuple(round(METRICS[m] * row[f"val_{m}"], 12) for m in order if row.get(f"val_{m}") is not None)


def stop_allowed(epoch, config):
    """Whether early stopping may end the run after `epoch`: the learning rate has fallen to
    STOP_BELOW_PEAK of its peak, or stays where it is for the rest of the run."""
    grid = [config_lr_factor(t, config) for t in range(config.epochs + 1)]
    now = config_lr_factor(epoch, config)
    return now <= STOP_BELOW_PEAK * max(grid) or min(grid[epoch:]) >= now


class Selector:
    """The best epoch so far by `metric`, and the early-stopping decision.

    patience None never stops; stop_below_peak False stops on patience alone (the rule before
    the learning-rate condition, kept to be scored by cross-validation).
    """

    def __init__(self, metric, patience, config, stop_below_peak=True):
        self.metric, self.patience, self.config, self.stop_below_peak = metric, patience, config, stop_below_peak
        self.best_key, self.best_epoch = None, None

    def update(self, row):
        """Take a validated row; True when it is the best so far."""
        key = score(row, self.metric)
        if self.best_key is None or key > tuple(self.best_key):
            self.best_key, self.best_epoch = list(key), row["epoch"]
            return True
        return False

    def stops_after(self, epoch):
        """Whether the run ends after `epoch` unless that epoch is the best so far."""
        if self.patience is None or self.best_epoch is None or epoch - self.best_epoch < self.patience:
            return False
        return not self.stop_below_peak or stop_allowed(epoch, self.config)

    def state_dict(self):
        return {"best_key": self.best_key, "best_epoch": self.best_epoch}

    def load_state_dict(self, state):
        self.best_key, self.best_epoch = state["best_key"], state["best_epoch"]


def replay(history, config, select, metric, patience, stop_below_peak=True):
    """(chosen epoch, last epoch trained) of a rule, replayed over a saved history whose every
    epoch ran (patience None in the run): the epoch the rule would have shipped, had the run
    used it, and where it would have stopped."""
    selector = Selector(metric, patience, config, stop_below_peak)
    last = None
    for row in history:
        last = row["epoch"]
        if row.get("val_loss") is not None:
            selector.update(row)
        if selector.stops_after(last):
            break
    return (selector.best_epoch if select == "best" else last), last


def chosen_row(history, config):
    """The history row of the epoch OUT/model.pt holds (the run's own rule, as fit ran it)."""
    epoch, _ = replay(history, config, config.select, config.select_metric, None)
    return next(row for row in history if row["epoch"] == epoch)


def metric_of(labels, probs, metric):
    """One selection metric of numpy labels (N,) and probabilities (N, C)."""
    if metric == "loss":
        return log_loss(labels, probs)
    if metric == "accuracy":
        return float((probs.argmax(1) == labels).mean())
    if metric == "balanced_accuracy":
        return balanced_accuracy(labels, probs.argmax(1))
    return auroc(labels, probs)


def paired_difference(labels, probs_a, probs_b, metric, n_resamples=N_RESAMPLES, seed=0, level=0.95):
    """metric(a) - metric(b) on the same images, and its percentile interval over paired
    bootstrap resamples (the same resampled images score both). Resamples that lose a class
    are left out, as in lib.metrics.bootstrap_ci, so each is the same estimator."""
    labels = np.asarray(labels)
    probs_a, probs_b = np.asarray(probs_a, dtype=np.float64), np.asarray(probs_b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    present = len(np.unique(labels))
    differences = []
    for _ in range(n_resamples):
        idx = rng.integers(0, len(labels), len(labels))
        if len(np.unique(labels[idx])) == present:
            differences.append(metric_of(labels[idx], probs_a[idx], metric) -
                               metric_of(labels[idx], probs_b[idx], metric))
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(differences, [tail, 100 - tail]) if differences else (np.nan, np.nan)
    return metric_of(labels, probs_a, metric) - metric_of(labels, probs_b, metric), float(low), float(high)


def ranking_note(labels, best_epoch, best_probs, last_epoch, last_probs, metric):
    """One log line on whether val can tell the best epoch from the last one, or None when they
    are the same epoch."""
    if best_epoch == last_epoch:
        return None
    difference, low, high = paired_difference(labels, best_probs, last_probs, metric)
    verdict = ("val is too small to rank them: the interval holds 0, so prefer the last epoch (--select last)"
               if low <= 0 <= high else "val tells them apart")
    return (f"note: best epoch {best_epoch} against the last, {last_epoch}: val {metric} differs by "
            f"{difference:+.4f} (95% paired-bootstrap interval {low:+.4f} to {high:+.4f}, {len(labels)} "
            f"images); {verdict}")


def balance_note(labels, num_classes, metric):
    """A log line on an unbalanced val split, saying whether `metric` weighs every class alike; None
    on a balanced one."""
    counts = np.bincount(np.asarray(labels), minlength=num_classes)
    present = counts[counts > 0]
    if present.max() <= UNBALANCED_RATIO * present.min():
        return None
    unbalanced = f"note: the val split is unbalanced (class sizes {present.min()} to {present.max()}): "
    if metric in CLASS_BALANCED:
        return unbalanced + f"epochs are ranked by {metric}, which weighs every class alike"
    return (unbalanced + f"{metric} ranks epochs mostly by the large classes; --select-metric "
            f"{' or '.join(CLASS_BALANCED)} weighs every class alike")


# Balanced accuracy within this of chance (1 / classes) is "at chance"; train accuracy this far
# above it means training learnt something val does not show.
AT_CHANCE, LEARNT = 0.05, 0.2


def chance_warning(history, num_classes):
    """A closing warning when every validation was at chance (balanced accuracy at most
    1/num_classes + AT_CHANCE) while the last epoch's train accuracy rose LEARNT above chance;
    otherwise None. One class for every val image (a collapsed model) looks like this."""
    validated = [row["val_balanced_accuracy"] for row in history if row.get("val_loss") is not None]
    chance, trained = 1 / num_classes, history[-1]["train_accuracy"]
    if not validated or max(validated) > chance + AT_CHANCE or trained < chance + LEARNT:
        return None
    return (f"warning: val balanced accuracy stayed at chance (at most {max(validated):.3f}; chance is {chance:.3f}) "
            f"while train accuracy rose to {trained:.3f}: this model predicts nothing useful. Check that the val "
            f"split holds the same kind of photos and labels as train; with --ema, --ema 0 validates the weights "
            f"being trained instead of their average")


def still_improving_note(history, config):
    """A closing note when the last validation was the best so far by config.select_metric and
    its val loss was lower than at the validation before: a longer run would likely do better.
    It names the flag that makes it longer: --epochs, or --min-steps where a small train split
    was gone over several times an epoch (there more epochs would mean fewer passes each).
    None otherwise."""
    metric = config.select_metric
    validated = [row for row in history if row.get("val_loss") is not None]
    if len(validated) < 2:
        return None
    before, last = validated[-2:]
    best_before = max(score(row, metric) for row in validated[:-1])
    if score(last, metric) <= best_before or last["val_loss"] >= before["val_loss"]:
        return None
    longer = (f"--min-steps {2 * config.min_steps}" if last.get("passes", 1) > 1 else f"--epochs {2 * last['epoch']}")
    return (f"note: still improving at the last validation (epoch {last['epoch']}: val {metric} "
            f"{last[f'val_{metric}']:.4f}, loss {last['val_loss']:.4f} against {before['val_loss']:.4f} at epoch "
            f"{before['epoch']}): a longer run would likely do better, e.g. {longer}")
