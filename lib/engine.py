"""The one training loop (train.py and transfer.py) and batched prediction.

Splits live in memory as uint8 tensors; each step indexes a batch, augments it as a whole and
normalises it with the checkpoint's mean/std. Every epoch writes OUT/last.pt (everything needed
to resume exactly: weights, optimizer, scheduler, gradient scaler, random states, history) and
OUT/best.pt when the validation score improves. The score is validation accuracy, ties broken by
AUROC, then by lower loss, always computed in float32 (mixed precision is for training only), so
evaluate.py reproduces the numbers best.pt was chosen on. Early stopping ends training after
`patience` epochs without improvement.
"""
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from lib import distributed, flops
from lib.augment import augment_batch, normalize
from lib.checkpoint import FORMAT, check_resume, load_checkpoint, save_checkpoint
from lib.errors import UserError
from lib.files import write_csv
from lib.metrics import epoch_metrics
from lib.models import fixed_input_size


@dataclass
class TrainConfig:
    """A training recipe; the defaults are train.py's (see README: the fast recipe and why)."""
    epochs: int = 20
    batch_size: int = 64
    optimizer: str = "adamw"
    lr: float = 2e-3
    lr_backbone: float | None = None
    weight_decay: float = 0.05
    scheduler: str = "cosine"
    step_size: int = 10
    gamma: float = 0.1
    label_smoothing: float = 0.1
    augment: str = "standard"
    patience: int = 10
    warmup_epochs: float = 1.0
    ema: float = 0.99
    eval_every: int = 2
    min_size: int = 32
    amp: bool = False
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False


def autocast(device, enabled):
    """bfloat16 on CPU (fast on CPUs with AMX/AVX512-BF16), float16 on CUDA."""
    if not enabled:
        return nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def amp_helps(device):
    """Whether mixed precision pays on this device (measured: 2.5x for resnet18 on AMX CPUs)."""
    if device.type == "cuda":
        return True
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def resolve_amp(choice, device):
    """--amp on|off|auto as a bool; auto means on where mixed precision pays."""
    return choice == "on" or (choice == "auto" and amp_helps(device))


def make_scaler(device, amp):
    """float16 on CUDA needs loss scaling; bfloat16 and float32 do not (a disabled scaler)."""
    return torch.amp.GradScaler("cuda", enabled=amp and device.type == "cuda")


@torch.no_grad()
def predict_probs(model, images, mean, std, device, batch_size=256, tta=False):
    """Class probabilities (float32, CPU) for uint8 images, in eval mode; tta adds the mirror.

    Always float32: validation, evaluate.py, explain.py and the export check all see the
    same numbers for the same weights.
    """
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start:start + batch_size].to(device).float().div_(255), mean, std)
        probs = F.softmax(model(x).float(), dim=1)
        if tta:
            probs = (probs + F.softmax(model(x.flip(3)).float(), dim=1)) / 2
        out.append(probs.cpu())
    return torch.cat(out) if out else torch.empty(0)


def make_optimizer(param_groups, name, lr, weight_decay):
    if name == "adam":
        return torch.optim.Adam(param_groups, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    raise UserError(f"--optimizer {name}: choose adam, adamw or sgd")


def lr_factor(t, name, epochs, step_size, gamma, warmup_epochs):
    """The learning-rate multiplier after t epochs (a float: the schedule moves every step)."""
    if name == "step":
        factor = gamma ** math.floor(t / step_size)
    elif name == "cosine":
        factor = 0.5 * (1 + math.cos(math.pi * min(t / epochs, 1)))
    elif name == "linear":
        factor = max(1 - t / epochs, 0.0)
    elif name == "none":
        factor = 1.0
    else:
        raise UserError(f"--scheduler {name}: choose step, cosine, linear or none")
    if warmup_epochs and t < warmup_epochs:
        factor *= (t + 1e-3) / warmup_epochs
    return factor


def make_scheduler(optimizer, config, steps_per_epoch):
    """Stepped after every batch, so short runs and warm-up get a smooth schedule."""
    lr_factor(0, config.scheduler, config.epochs, config.step_size, config.gamma, 0)  # name check
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        step / steps_per_epoch, config.scheduler, config.epochs, config.step_size, config.gamma,
        config.warmup_epochs))


def train_size(epoch, epochs, min_size, image_size):
    """Progressive resizing: the side trained on in `epoch`, growing linearly from min_size to
    image_size over the first three quarters of the epochs (multiples of 8), then full size."""
    if not min_size or min_size >= image_size:
        return image_size
    ramp = max(round(0.75 * epochs) - 1, 1)
    side = min_size + (image_size - min_size) * min((epoch - 1) / ramp, 1)
    return min(image_size, int(round(side / 8) * 8))


def _score(metrics):
    return (metrics["val_accuracy"], metrics["val_auroc"], -metrics["val_loss"])


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


def validated(history):
    """The rows of epochs that were validated (with --eval-every, not all are)."""
    return [row for row in history if row.get("val_loss") is not None]


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


def best_epoch(history):
    """The history row with the best validation score (the one best.pt holds)."""
    return max(validated(history), key=_score)


def cost_summary(history):
    """The run's compute and time, for the scripts' last line."""
    return (f"{len(history)} epochs, {history[-1]['total_tflop']:.2f} TFLOP, "
            f"{sum(row['seconds'] for row in history):.0f} s")


def _epoch_batches(split, seed, epoch, batch_size):
    """This process's batches of one epoch, as index tensors.

    Randomness is a function of (seed, epoch), not carried state, so a resumed run repeats an
    uninterrupted one. The order is shared by all processes (each takes its equal-length
    share, padded by DistributedSampler).
    """
    sampler = DistributedSampler(split, num_replicas=distributed.world_size(), rank=distributed.rank(),
                                 shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    order = torch.tensor(list(sampler), dtype=torch.int64)
    local_batch = max(batch_size // distributed.world_size(), 1)
    # Drop a last batch of one image: BatchNorm cannot train on it.
    batches = [order[i:i + local_batch] for i in range(0, len(order), local_batch)]
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches.pop()
    return batches


def make_ema(model, decay):
    """The exponential moving average of `model`'s weights and BatchNorm statistics, or None (decay 0)."""
    return AveragedModel(model, multi_avg_fn=_ema_update(decay), use_buffers=True) if decay else None


def _ema_update(decay):
    """AveragedModel's update with a warm-up: the decay grows towards `decay` as (1 + n) / (10 + n),
    so the average is not dominated by the random initial weights in a short run."""
    @torch.no_grad()
    def update(averaged, current, n_averaged):
        step_decay = min(decay, (1 + float(n_averaged)) / (10 + float(n_averaged)))
        if averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, 1 - step_decay)
        else:  # BatchNorm's step counters
            torch._foreach_copy_(averaged, current)
    return update


class ComputeCounter:
    """FLOPs of a run: training images forward and backward at each epoch's size, validation
    images forward, each size counted once (lib.flops)."""

    def __init__(self, model, num_classes, image_size):
        self.model, self.num_classes = model, num_classes
        self.train_per_image, self.eval_per_image = {}, flops.inference_flops(model, image_size)

    def epoch(self, train_images, size, val_images):
        if size not in self.train_per_image:
            self.train_per_image[size] = flops.training_flops(self.model, size, self.num_classes)
        return train_images * self.train_per_image[size] + val_images * self.eval_per_image


def fit(model, train, val, *, describe, config, out, device, seed, param_groups=None,
        frozen_modules=(), resume=False):
    """Train `model` on the `train` Split, select on `val`, and write checkpoints into `out`.

    describe: the self-describing part of every checkpoint (model, classes, image size,
    mean/std, args, lineage). param_groups: optimizer groups (default: all trainable
    parameters). frozen_modules stay in eval mode so their BatchNorm statistics do not move.
    With config.ema the exponential moving average of the weights is what is validated and
    saved as best.pt. Returns the history, a list of per-epoch metric dicts.
    """
    out = Path(out)
    mean, std, image_size = describe["mean"], describe["std"], train.images.shape[-1]
    check_splits(train, val)
    if config.min_size and fixed_input_size(describe.get("model", "")):
        config = replace(config, min_size=0)
        if distributed.is_main():
            print(f"note: {describe['model']} takes {image_size} px inputs only, so every epoch trains at "
                  f"{image_size} px (--min-size is for models that pool globally)")
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    groups = param_groups or [{"params": [p for p in model.parameters() if p.requires_grad]}]
    optimizer = make_optimizer(groups, config.optimizer, config.lr, config.weight_decay)
    steps_per_epoch = len(_epoch_batches(train, seed, 1, config.batch_size))
    scheduler = make_scheduler(optimizer, config, steps_per_epoch)
    scaler = make_scaler(device, config.amp)
    ema = make_ema(model, config.ema)
    evaluated = ema.module if ema else model
    compute = ComputeCounter(model, len(train.classes), image_size)
    history, best, start_epoch, stale = [], None, 1, 0
    if resume:
        state = load_checkpoint(out / "last.pt")
        check_resume(state, describe, out / "last.pt")
        model.load_state_dict(state.get("raw_state_dict", state["state_dict"]))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema:
            ema.load_state_dict(state["ema"])
        if state.get("scaler"):  # empty when saved by a disabled (non-CUDA or non-AMP) scaler
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        history, best, stale = state["history"], state["best_score"], state["stale_epochs"]
        start_epoch = state["epoch"] + 1
        if distributed.is_main():
            print(f"resuming {out / 'last.pt'} after epoch {state['epoch']}")
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

    saved = start_epoch - 1
    try:
        for epoch in range(start_epoch, config.epochs + 1):
            if best is not None and stale >= config.patience:
                break
            started = time.perf_counter()
            size = train_size(epoch, config.epochs, config.min_size, image_size)
            batches = _epoch_batches(train, seed, epoch, config.batch_size)
            train_stats, lr = _train_epoch(net, model, ema, frozen_modules, train, batches, mean, std, config,
                                           optimizer, scheduler, scaler, seed, device, epoch, size)
            distributed.average_buffers(model)
            if ema:
                distributed.average_buffers(ema.module)
            validate = epoch % config.eval_every == 0 or epoch == config.epochs
            if validate:
                val_probs = distributed.gather_in_order(
                    predict_probs(evaluated, distributed.shard(val.images), mean, std, device),
                    len(val))
                val_stats = epoch_metrics(val.labels, val_probs)
            else:
                val_stats = {"loss": None, "accuracy": None, "auroc": None}
            tflop = compute.epoch(sum(len(b) for b in batches) * distributed.world_size(), size,
                                  len(val) if validate else 0) / 1e12
            row = {"epoch": epoch, "size": size, **{f"train_{k}": v for k, v in train_stats.items()},
                   **{f"val_{k}": v for k, v in val_stats.items()},
                   "lr": lr, "seconds": time.perf_counter() - started, "tflop": tflop,
                   "total_tflop": tflop + (history[-1]["total_tflop"] if history else 0.0)}
            history.append(row)
            # Every process computes the same row from the same gathered numbers, so the
            # best/stale bookkeeping and the early-stopping decision agree without a broadcast.
            improved = validate and (best is None or _score(row) > tuple(best))
            if improved:
                best, stale = list(_score(row)), 0
            elif validate:
                stale += config.eval_every
            if distributed.is_main():
                checkpoint = {"format": FORMAT, **describe, "epoch": epoch, "metrics": row,
                              "state_dict": evaluated.state_dict()}
                if improved:
                    save_checkpoint(checkpoint, out / "best.pt")
                # state_dict is always the validated weights (the average, with --ema); the
                # weights being trained travel beside it for --resume.
                save_checkpoint({**checkpoint, **({"raw_state_dict": model.state_dict(), "ema": ema.state_dict()}
                                                  if ema else {}),
                                 "optimizer": optimizer.state_dict(),
                                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                                 "history": history,
                                 "best_score": best, "stale_epochs": stale,
                                 "rng": {"torch": torch.get_rng_state()}},
                                out / "last.pt")
                write_csv(history, out / "metrics.csv")
                saved = epoch
                scores = (f"val loss {row['val_loss']:.3f} acc {row['val_accuracy']:.3f} "
                          f"auroc {row['val_auroc']:.4f}" if validate else "(not validated)")
                print(f"epoch {epoch:3d}/{config.epochs}  {size}px  train loss {row['train_loss']:.3f} "
                      f"acc {row['train_accuracy']:.3f}  {scores}  {row['seconds']:.1f}s "
                      f"{row['tflop']:.2f} TFLOP{'  *best' if improved else ''}", flush=True)
    except KeyboardInterrupt:
        # last.pt holds the last finished epoch (saved atomically), from which --resume is exact.
        if distributed.is_main():
            kept = f"{out / 'last.pt'} holds epoch {saved}" if saved else "no epoch finished"
            print(f"interrupted: {kept}; continue with --resume", file=sys.stderr)
        raise
    return history


def _train_epoch(net, model, ema, frozen_modules, split, batches, mean, std, config, optimizer, scheduler, scaler,
                 seed, device, epoch, size):
    """One pass over `batches`; returns the epoch's training metrics and mean learning rate."""
    set_train_mode(net, frozen_modules)
    # Augmentation differs per process and epoch, and repeats for the same seed.
    augment_seed = ((seed * 1_000_003 + epoch) * 1_009 + distributed.rank()) % 2**63
    generator = torch.Generator().manual_seed(augment_seed)
    labels, probs, rates = [], [], []
    bar = tqdm(batches, desc=f"epoch {epoch}", leave=False, file=sys.stderr,
               disable=None if distributed.is_main() else True)
    for index in bar:
        x = normalize(augment_batch(split.images[index], config.augment, generator, size).to(device), mean, std)
        y = split.labels[index].to(device)
        if config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, config.amp):
            logits = net(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
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
        labels.append(y.cpu())
        probs.append(F.softmax(logits.detach().float(), dim=1).cpu())
    # Plain cross-entropy of the augmented batches (of all processes), comparable with the validation loss.
    stats = epoch_metrics(distributed.gather_all(torch.cat(labels)), distributed.gather_all(torch.cat(probs)))
    return stats, sum(rates) / len(rates)


def config_from_args(args, device):
    """The TrainConfig of parsed arguments (train.py and transfer.py), --amp auto resolved for `device`."""
    fields = {k: getattr(args, k) for k in asdict(TrainConfig()) if hasattr(args, k)}
    fields["amp"] = resolve_amp(args.amp, device)
    return TrainConfig(**fields)
