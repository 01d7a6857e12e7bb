"""The one training loop (train.py, transfer.py and crossval.py).

Splits live in memory as uint8 tensors; each step indexes a batch, augments it as a whole and
normalises it with the checkpoint's mean/std; validation predicts with lib.inference. Every epoch
writes OUT/last.pt (everything needed to resume exactly: lib.checkpoint.training_state) and
OUT/best.pt when the validation score improves; the end of training writes OUT/model.pt, the
checkpoint the run recommends. Which epoch is best, which one model.pt holds and when to stop
early is lib.selection's policy.
Validation always runs in float32 (mixed precision is for training only), so evaluate.py
reproduces the numbers best.pt was chosen on. The recipe (config, schedules, weight average,
precision) is lib.recipe.
"""
import copy
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from lib import balance, distributed, flops, mixing, selection
from lib.augment import augment_batch
from lib.checkpoint import (FORMAT, check_resume, load_checkpoint, restore_training_state, save_checkpoint,
                            training_state, without_training_state)
from lib.errors import UserError
from lib.files import write_csv
from lib.inference import normalize, predict_probs, to_input
from lib.loss import cross_entropy
from lib.metrics import epoch_metrics, per_class_recall
from lib.models import fixed_input_size
from lib.recipe import (autocast, make_ema, make_optimizer, make_scaler, make_scheduler, passes_per_epoch,
                        reestimate_batchnorm, train_size)


def check_splits(train, val):
    """Training needs images of every class; validation needs two classes (AUROC, selection)."""
    if train.labels is None or val.labels is None:
        raise UserError("training needs labelled train and val splits")
    missing = sorted(set(range(len(train.classes))) - set(train.labels.tolist()))
    if missing:
        raise UserError(f"the train split has no images of class(es) "
                        f"{', '.join(train.classes[i] for i in missing)}")
    found = len(val.labels.unique())
    if found < 2:
        raise UserError(f"the val split needs labelled images of at least two classes "
                        f"(AUROC and model selection), found {len(val)} image(s) of {found} class")


def convert_sync_bn(model, frozen_modules):
    """SyncBatchNorm in place of BatchNorm; returns the model and the frozen modules as they are now.

    convert_sync_batchnorm puts new module objects where BatchNorm layers were, so a frozen
    BatchNorm held by reference would no longer be part of the model: it would be the old
    object that is kept in eval mode while the new one trains and moves its statistics.
    """
    names = {id(module): name for name, module in model.named_modules()}
    frozen_names = [names[id(module)] for module in frozen_modules]
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model, [model.get_submodule(name) for name in frozen_names]


def set_train_mode(net, frozen_modules):
    """Training mode, except for frozen stages: their BatchNorm statistics must not move."""
    net.train()
    for module in frozen_modules:
        module.eval()


def cost_summary(history):
    """The run's compute and time, for the scripts' last line."""
    return (f"{len(history)} epochs, {history[-1]['total_tflop']:.2f} TFLOP, "
            f"{sum(row['seconds'] for row in history):.0f} s")


def recall_summary(checkpoint):
    """The per-class val recall of a saved checkpoint (e.g. OUT/model.pt's), for the scripts' closing lines."""
    recall = checkpoint["metrics"].get("val_recall") or {}
    return "val recall per class: " + ", ".join(
        f"{name} {'-' if value is None else f'{value:.3f}'}" for name, value in recall.items())


def run_report(out, history, config, best_epoch=None):
    """The closing lines of train.py and transfer.py for the run in `out`: per-class val recall of
    OUT/model.pt, then its epoch and val scores (and best.pt's epoch when given), compute and time;
    then a warning if val stayed at chance while training learnt, a note if it was still improving."""
    chosen = selection.chosen_row(history, config)
    recommended = load_checkpoint(out / "model.pt")
    best = f"best.pt: epoch {best_epoch}; " if best_epoch is not None else ""
    notes = [selection.chance_warning(history, len(recommended["classes"])),
             selection.still_improving_note(history, config)]
    return "\n".join([recall_summary(recommended),
                      f"{out / 'model.pt'}: epoch {chosen['epoch']} (--select {config.select}), val accuracy "
                      f"{chosen['val_accuracy']:.4f}, balanced accuracy {chosen['val_balanced_accuracy']:.4f}, "
                      f"AUROC {chosen['val_auroc']:.4f}; {best}{cost_summary(history)}",
                      *[note for note in notes if note]])


def _epoch_batches(split, seed, epoch, batch_size, sampler="shuffle", passes=1):
    """This process's batches of one epoch (`passes` passes over the split), as index tensors.

    Randomness is a function of (seed, epoch), not carried state, so a resumed run repeats an
    uninterrupted one. The order is shared by all processes (each takes its equal-length
    share, padded by DistributedSampler; --sampler balanced: lib.balance.balanced_order).
    Each pass is shuffled as an epoch of its own; with one pass, exactly as epoch `epoch`.
    """
    return [batch for part in range(passes)
            for batch in _pass_batches(split, seed, (epoch - 1) * passes + part + 1, batch_size, sampler)]


def _pass_batches(split, seed, key, batch_size, sampler):
    """One shuffled pass over `split` in batches, seeded by (seed, key)."""
    if sampler == "balanced":
        order = balance.balanced_order(split.labels, seed, key, distributed.world_size(), distributed.rank())
    else:
        shuffle = DistributedSampler(split, num_replicas=distributed.world_size(), rank=distributed.rank(),
                                     shuffle=True, seed=seed)
        shuffle.set_epoch(key)
        order = torch.tensor(list(shuffle), dtype=torch.int64)
    local_batch = max(batch_size // distributed.world_size(), 1)
    # Drop a last batch of one image: BatchNorm cannot train on it.
    batches = [order[i:i + local_batch] for i in range(0, len(order), local_batch)]
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches.pop()
    return batches


class ComputeCounter:
    """FLOPs of a run: training images forward and backward at each epoch's size, validation
    images (and those re-estimating the average's BatchNorm statistics) forward at the full
    size, each size counted once (lib.flops)."""

    def __init__(self, model, num_classes, image_size):
        self.model, self.num_classes = model, num_classes
        self.train_per_image, self.eval_per_image = {}, flops.inference_flops(model, image_size)

    def epoch(self, train_images, size, forward_images):
        if size not in self.train_per_image:
            self.train_per_image[size] = flops.training_flops(self.model, size, self.num_classes)
        return train_images * self.train_per_image[size] + forward_images * self.eval_per_image


def batchnorm_batches(split, seed, epoch, count, batch_size, mean, std, device):
    """Normalised batches of `count` training images drawn by (seed, epoch), unaugmented at the
    split's size: what the average's BatchNorm statistics are re-estimated on. The batches are of
    near-equal sizes, so none is a single image (BatchNorm cannot train on one)."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
    index = torch.randperm(len(split), generator=generator)[:count]
    for part in torch.tensor_split(index, math.ceil(len(index) / batch_size)):
        yield to_input(split.images[part].to(device), mean, std)


def modules_in(copy_of_model, model, modules):
    """The modules of `copy_of_model` (e.g. the average) that are `modules` in `model`, found by name."""
    names = {id(module): name for name, module in model.named_modules()}
    return [copy_of_model.get_submodule(names[id(module)]) for module in modules]


def _scratch_copy(model, frozen_modules):
    """A CPU float32 copy to try forward passes on, with its frozen stages found again in it."""
    scratch = copy.deepcopy(model).cpu().float()
    return scratch, modules_in(scratch, model, frozen_modules)


def _forward_error(scratch, frozen_modules, batch, size, train):
    """The first line of the error a forward pass of zeros raises on `scratch`, or None.
    Some torchvision models check their input with assert, hence AssertionError. Runs on a forked
    random generator: a training-mode pass draws for dropout, and a trial must not move the run's."""
    if train:
        set_train_mode(scratch, frozen_modules)
    else:
        scratch.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            scratch(torch.zeros(batch, 3, size, size))
    except (RuntimeError, ValueError, AssertionError) as error:
        return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return None


def check_input_sizes(model, frozen_modules, name, config, image_size, smallest_batch):
    """Refuse, before training, what the network cannot run: a forward pass on a scratch copy
    at the image size (eval), at the smallest progressive-resizing size (training, 2 images)
    and with the smallest batch (training: BatchNorm needs more than one value per channel).
    The smallest workable --min-size is found the same way, so no per-model table is needed."""
    scratch, frozen = _scratch_copy(model, frozen_modules)
    smallest = train_size(1, config.epochs, config.min_size, image_size)
    error = _forward_error(scratch, frozen, 1, image_size, train=False)
    if error:
        raise UserError(f"--image-size {image_size}: {name} cannot run on {image_size} px images ({error})")
    error = _forward_error(scratch, frozen, 2, smallest, train=True)
    if error and smallest < image_size:
        works = next((size for size in range(smallest + 1, image_size)
                      if not _forward_error(scratch, frozen, 2, size, train=True)), image_size)
        raise UserError(f"--min-size {config.min_size}: {name} cannot run on {smallest} px images ({error}); "
                        f"use --min-size {works} or more, or 0 (no progressive resizing)")
    if error:
        raise UserError(f"--image-size {image_size}: {name} cannot train at this size ({error})")
    error = smallest_batch < 2 and _forward_error(scratch, frozen, smallest_batch, smallest, train=True)
    if error:
        per_process = f" ({smallest_batch} per process)" if distributed.world_size() > 1 else ""
        raise UserError(f"--batch-size {config.batch_size}: {name} cannot train on batches of one image{per_process} "
                        f"at {smallest} px, its BatchNorm would see one value per channel ({error}); use "
                        f"--batch-size {2 * distributed.world_size()} or more")


def fit(model, train, val, *, describe, config, out, device, seed, param_groups=None,
        frozen_modules=(), resume=False, monitor=None, unlabelled=None, teacher=None):
    """Train `model` on the `train` Split, select on `val`, and write checkpoints into `out`.

    describe: the self-describing part of every checkpoint (model, classes, image size,
    mean/std, args, lineage). param_groups: optimizer groups (default: all trainable
    parameters). frozen_modules stay in eval mode so their BatchNorm statistics do not move.
    With config.ema the exponential moving average of the weights is what is validated and
    saved. monitor(epoch, model), if given, is called on the main process after every
    validated epoch with the validated weights (crossval.py predicts its held-out fold there;
    nothing it does feeds back into training). unlabelled (lib.unlabelled.FixMatch) or None adds
    its views of unlabelled photos to every step's batch and its loss to the step's loss; the
    share of those photos it used is each epoch's `unlabelled_used`. teacher (lib.distill.Teacher)
    or None turns each batch's targets into its blend with the teacher's probabilities (its forward
    passes are counted in the TFLOP). Writes best.pt, last.pt,
    metrics.csv and, at the end, model.pt (lib.selection). Returns the history, a list of per-epoch metric dicts.
    """
    out = Path(out)
    mean, std, image_size = describe["mean"], describe["std"], train.images.shape[-1]
    check_splits(train, val)
    selection.check_choice(config.select, config.select_metric)
    balance.check_choice(config.class_weights, config.sampler)
    if config.min_size and fixed_input_size(describe.get("model", "")):
        config = replace(config, min_size=0)
        if distributed.is_main():
            print(f"note: {describe['model']} takes {image_size} px inputs only, so every epoch trains at "
                  f"{image_size} px (--min-size is for models that pool globally)")
    passes = passes_per_epoch(len(train), config.batch_size, config.epochs, config.min_steps)
    if passes > 1 and distributed.is_main():
        print(f"{len(train)} train images: each epoch goes over them {passes} times, so {config.epochs} epochs "
              f"make at least --min-steps {config.min_steps} updates")
    first_batches = _epoch_batches(train, seed, 1, config.batch_size, config.sampler, passes)
    check_input_sizes(model, frozen_modules, describe.get("model", "the model"), config, image_size,
                      min(len(batch) for batch in first_batches))
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    groups = param_groups or [{"params": [p for p in model.parameters() if p.requires_grad]}]
    optimizer = make_optimizer(groups, config.optimizer, config.lr, config.weight_decay)
    scheduler = make_scheduler(optimizer, config, steps_per_epoch=len(first_batches))
    scaler = make_scaler(device, config.amp)
    ema = make_ema(model, config.ema, average_buffers=not config.ema_bn_images)
    evaluated = ema.module if ema else model
    averaged_frozen = modules_in(ema.module, model, frozen_modules) if ema else []
    compute = ComputeCounter(model, len(train.classes), image_size)
    weights = None
    if config.class_weights == "balanced":
        weights = balance.class_weights(train.labels, len(train.classes)).to(device)
    mixer = mixing.make_mixer(config.mixup, config.cutmix, len(train.classes))
    selector = selection.Selector(config.select_metric, config.patience, config)
    history, start_epoch, best_probs, last_probs = [], 1, None, None
    if resume:
        saved = load_checkpoint(out / "last.pt")
        check_resume(saved, describe, out / "last.pt")
        best_probs = restore_training_state(saved, out / "last.pt", model, ema, optimizer, scheduler, scaler,
                                            selector)
        history, start_epoch = saved["history"], saved["epoch"] + 1
        if distributed.is_main():
            print(f"resuming {out / 'last.pt'} after epoch {saved['epoch']}")
    note = selection.balance_note(val.labels, len(val.classes), config.select_metric)
    if note and distributed.is_main():
        print(note)
    if weights is not None and distributed.is_main():
        print("class weights (balanced, from the train split): " +
              ", ".join(f"{name} {w:.3g}" for name, w in zip(train.classes, weights.tolist())))
    net = model
    if distributed.world_size() > 1:
        if config.sync_bn and device.type != "cuda":
            raise UserError("--sync-bn: PyTorch's SyncBatchNorm runs only on GPUs; on CPU leave it off "
                            "(BatchNorm statistics are then averaged across processes after each epoch)")
        if config.sync_bn:
            net, frozen_modules = convert_sync_bn(net, frozen_modules)
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
        if distributed.is_main():
            print(f"DistributedDataParallel over {distributed.world_size()} processes "
                  f"({torch.distributed.get_backend()}), {config.batch_size} images per step in all")
    if config.compile:
        # Only the training step is compiled; validation runs the eager model, so the last,
        # smaller batch and eval mode cost no recompilation.
        net = torch.compile(net)

    saved_epoch = start_epoch - 1
    try:
        for epoch in range(start_epoch, config.epochs + 1):
            if epoch > 1 and selector.stops_after(epoch - 1):
                break
            started = time.perf_counter()
            size = train_size(epoch, config.epochs, config.min_size, image_size)
            batches = _epoch_batches(train, seed, epoch, config.batch_size, config.sampler, passes)
            train_stats, lr = _train_epoch(net, model, ema, frozen_modules, train, batches, mean, std, config,
                                           optimizer, scheduler, scaler, seed, device, epoch, size, weights, mixer,
                                           unlabelled, teacher)
            distributed.average_buffers(model)
            if ema:
                distributed.average_buffers(ema.module)
            # Also the epoch early stopping would end the run after, so the run ends validated.
            validate = epoch % config.eval_every == 0 or epoch == config.epochs or selector.stops_after(epoch)
            reestimated = 0
            if validate and ema and config.ema_bn_images:
                reestimated = reestimate_batchnorm(ema.module, batchnorm_batches(
                    train, seed, epoch, config.ema_bn_images, config.batch_size, mean, std, device), averaged_frozen)
            if validate:
                val_probs = distributed.gather_in_order(
                    predict_probs(evaluated, distributed.shard(val.images), mean, std, device), len(val))
                val_stats, last_probs = epoch_metrics(val.labels, val_probs), val_probs
                recall = per_class_recall(val.labels, val_probs, val.classes)
            else:
                val_stats = {key: None for key in train_stats}
            labelled = sum(len(b) for b in batches) * distributed.world_size()
            # Each unlabelled photo of a step is two more training images (its weak and strong views).
            trained = labelled * (3 if unlabelled else 1)
            tflop = compute.epoch(trained, size, (len(val) + reestimated) if validate else 0) / 1e12
            if teacher:
                tflop += labelled * teacher.flops_per_image / 1e12
            row = {"epoch": epoch, "size": size, "passes": passes,
                   **{f"train_{k}": v for k, v in train_stats.items()},
                   **{f"val_{k}": v for k, v in val_stats.items()},
                   **({"unlabelled_used": unlabelled.share_used()} if unlabelled else {}),
                   "lr": lr, "seconds": time.perf_counter() - started, "tflop": tflop,
                   "total_tflop": tflop + (history[-1]["total_tflop"] if history else 0.0)}
            history.append(row)
            # Every process computes the same row from the same gathered numbers, so the
            # selection and the early-stopping decision agree without a broadcast.
            improved = validate and selector.update(row)
            if improved:
                best_probs = val_probs
            if distributed.is_main():
                # Per-class recall travels in the checkpoints only: metrics.csv keeps one column per number.
                checkpoint = {"format": FORMAT, **describe, "epoch": epoch,
                              "metrics": {**row, "val_recall": recall} if validate else row,
                              "state_dict": evaluated.state_dict()}
                if improved:
                    save_checkpoint(checkpoint, out / "best.pt")
                # state_dict is always the validated weights (the average, with --ema); the
                # weights being trained travel in the training state for --resume.
                save_checkpoint({**checkpoint, "history": history,
                                 "training": training_state(model, ema, optimizer, scheduler, scaler, selector,
                                                            best_probs)},
                                out / "last.pt")
                write_csv(history, out / "metrics.csv")
                saved_epoch = epoch
                if validate and monitor:
                    monitor(epoch, evaluated)
                scores = (f"val loss {row['val_loss']:.3f} acc {row['val_accuracy']:.3f} "
                          f"auroc {row['val_auroc']:.4f}" if validate else "(not validated)")
                used = f"  unlabelled used {row['unlabelled_used']:.0%}" if unlabelled else ""
                print(f"epoch {epoch:3d}/{config.epochs}  {size}px  train loss {row['train_loss']:.3f} "
                      f"acc {row['train_accuracy']:.3f}{used}  {scores}  {row['seconds']:.1f}s "
                      f"{row['tflop']:.2f} TFLOP{'  *best' if improved else ''}", flush=True)
    except KeyboardInterrupt:
        # last.pt holds the last finished epoch (saved atomically), from which --resume is exact.
        if distributed.is_main():
            kept = f"{out / 'last.pt'} holds epoch {saved_epoch}" if saved_epoch else "no epoch finished"
            print(f"interrupted: {kept}; continue with --resume", file=sys.stderr)
        raise
    if distributed.is_main():
        if history[-1]["epoch"] < config.epochs:
            print(f"early stopping after epoch {history[-1]['epoch']}: {config.patience} epochs without a better "
                  f"val {config.select_metric} (best: epoch {selector.best_epoch})")
        note = last_probs is not None and selection.ranking_note(
            val.labels, selector.best_epoch, best_probs, history[-1]["epoch"], last_probs, config.select_metric)
        if note:
            print(note)
        write_recommended(out, config)
    return history


def write_recommended(out, config):
    """OUT/model.pt: the checkpoint --select chose (best.pt's or last.pt's epoch), without the
    training state; what later steps (evaluate, explain, export, transfer) should use."""
    chosen = load_checkpoint(out / ("best.pt" if config.select == "best" else "last.pt"))
    save_checkpoint({**without_training_state(chosen),
                     "selection": {"select": config.select, "metric": config.select_metric, "epoch": chosen["epoch"]}},
                    out / "model.pt")


def _train_epoch(net, model, ema, frozen_modules, split, batches, mean, std, config, optimizer, scheduler, scaler,
                 seed, device, epoch, size, class_weights=None, mixer=None, unlabelled=None, teacher=None):
    """One pass over `batches`; returns the epoch's training metrics and mean learning rate.

    class_weights (C,) or None weigh the loss (lib.loss); mixer (lib.mixing) or None mixes each
    augmented batch, seeded by the step. Training metrics are against each image's hard label:
    with mixing, the label that dominates its mixture (as torchvision's reference scripts count).
    unlabelled (lib.unlabelled.FixMatch) or None: its views join each batch's forward pass (one
    BatchNorm batch) and its loss the step's; training metrics stay the labelled images'.
    teacher (lib.distill.Teacher) or None: its targets for each (augmented, mixed) batch replace the
    labels' in the loss; training metrics stay against the labels."""
    set_train_mode(net, frozen_modules)
    # Augmentation differs per process and epoch, and repeats for the same seed.
    augment_seed = ((seed * 1_000_003 + epoch) * 1_009 + distributed.rank()) % 2**63
    generator = torch.Generator().manual_seed(augment_seed)
    # Filled in place: small tensors kept per batch would pin glibc heap memory, batch after batch
    # (measured: private memory grew 6 MB a batch, 1.7 GB over a 250-batch epoch).
    labels = torch.empty(sum(len(b) for b in batches), dtype=torch.int64)
    probs, rates, filled = torch.empty(len(labels), len(split.classes)), [], 0
    if unlabelled:
        unlabelled.start_epoch()
    bar = tqdm(batches, desc=f"epoch {epoch}", leave=False, file=sys.stderr,
               disable=None if distributed.is_main() else True)
    for step, index in enumerate(bar):
        x, y = augment_batch(split.images[index], config.augment, generator, size), split.labels[index]
        targets = F.one_hot(y, len(split.classes)).float()
        if mixer:
            x, targets = mixing.mix(mixer, x, y, mixing.step_seed(seed, epoch, step, distributed.rank()))
        views = unlabelled.views(seed, epoch, step, len(index), size, generator) if unlabelled else ()
        y, targets = targets.argmax(1).to(device), targets.to(device)
        x = torch.cat([x, *views]).to(device)
        if teacher:
            targets = teacher.targets(x[:len(y)], targets)
        x = normalize(x, mean, std)
        if config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, config.amp):
            logits = net(x)
            loss = cross_entropy(logits[:len(y)].float(), targets, class_weights, config.label_smoothing)
            if unlabelled:
                loss = loss + unlabelled.loss(logits[len(y):])
            logits = logits[:len(y)]
        # Decided by all processes together: one raising alone would leave the others waiting
        # in backward's all-reduce forever.
        value = loss.item()
        diverged = distributed.count_true(not math.isfinite(value), device)
        if diverged:
            what = (f"non-finite loss on {diverged} of {distributed.world_size()} processes"
                    if distributed.world_size() > 1 else f"loss {value}")
            raise UserError(f"training diverged at epoch {epoch} ({what}); lower --lr")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        rates.append(optimizer.param_groups[-1]["lr"])
        scheduler.step()
        if ema:
            ema.update_parameters(model)
        labels[filled:filled + len(y)] = y.cpu()
        probs[filled:filled + len(y)] = F.softmax(logits.detach().float(), dim=1).cpu()
        filled += len(y)
    # Plain cross-entropy of the augmented batches (of all processes) against their hard labels,
    # comparable with the validation loss.
    stats = epoch_metrics(distributed.gather_all(labels), distributed.gather_all(probs))
    return stats, sum(rates) / len(rates)
