"""The named training recipes and their pure parts: the config, optimiser, schedules, weight
average, precision.

The schedules are functions of (epoch, step) and the config only, not carried state, which is
what makes a resumed run repeat an uninterrupted one: the learning rate after t epochs
(lr_factor), the image side of each epoch (train_size).
"""
import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
from torch.optim.swa_utils import AveragedModel

from lib.errors import UserError


@dataclass(frozen=True)
class TrainConfig:
    """A training recipe; the defaults are train.py's, RECIPES["train"] (docs/recipes.md: how it was found)."""
    epochs: int = 20
    min_steps: int = 600             # optimizer updates at least (passes_per_epoch); 0: one pass an epoch
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
    mixup: float = 0.0               # alpha of MixUp (lib.mixing); 0: off
    cutmix: float = 0.0              # alpha of CutMix; 0: off
    class_weights: str = "none"      # lib.balance
    sampler: str = "shuffle"
    patience: int | None = 10  # None: never stop early
    warmup_epochs: float = 1.0
    ema: float = 0.99
    ema_bn_images: int = 64          # training images that re-estimate the average's BatchNorm statistics;
                                     # 0: averaged with the weights (lib.recipe.make_ema)
    eval_every: int = 2
    min_size: int = 32
    select: str = "best"             # which checkpoint OUT/model.pt is: lib.selection
    select_metric: str = "balanced_accuracy"  # what "best" means: every class alike (equals accuracy on balanced val)
    unlabelled_weight: float = 1.0   # FixMatch (lib.unlabelled): weight of the unlabelled photos' loss
    threshold: float = 0.95          # and the confidence a pseudo-label needs (the paper's values)
    teacher_weight: float = 1.0      # distillation (lib.distill): the teacher's share of each target
    amp: bool = False
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False


# The named recipes, side by side: the defaults of train.py ("train") and of transfer.py and
# crossval.py ("transfer"). Tune them here, nowhere else. Above each, the docs/recipes.md sections
# its figures come from (docs/training.md, "train.py's recipe", lists every figure of the first).
RECIPES = {
    # "The source recipe in short" (20 epochs, weight average 0.99, a warm-up epoch, progressive resizing
    # from 32 px, validation every 2 epochs), "The average's BatchNorm statistics, and small train splits"
    # (--ema-bn-images 64, --min-steps 600), "MixUp and CutMix, measured" (both off).
    "train": TrainConfig(),
    # "Target task" (AdamW lr 1e-3, the standard augmentation; weight average 0.95: 7 steps an epoch on 420
    # images need a shorter memory than train's), "Nested cross-validation of the checkpoint rule and the
    # schedule" (30 epochs at full size, the last epoch, no early stopping); 140 val images are cheap to
    # validate every epoch; one pass an epoch (--min-steps 0).
    "transfer": TrainConfig(epochs=30, min_steps=0, lr=1e-3, patience=None, ema=0.95, eval_every=1, min_size=0,
                            select="last"),
}


def config_from_args(args, device):
    """The TrainConfig of parsed arguments (train.py, transfer.py, crossval.py), --amp auto resolved for `device`."""
    fields = {k: getattr(args, k) for k in asdict(TrainConfig()) if hasattr(args, k)}
    fields["amp"] = resolve_amp(args.amp, device)
    return TrainConfig(**fields)


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


def make_optimizer(param_groups, name, lr, weight_decay):
    if name == "adam":
        return torch.optim.Adam(param_groups, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    raise UserError(f"--optimizer {name}: choose adam, adamw or sgd")


def lr_factor(t, name, epochs, step_size, gamma, warmup_epochs):
    """The learning-rate multiplier after t epochs (a float: the schedule moves every step); a
    linear warm-up over warmup_epochs first, except for onecycle, which has its own."""
    if name == "step":
        factor = gamma ** math.floor(t / step_size)
    elif name == "cosine":
        factor = 0.5 * (1 + math.cos(math.pi * min(t / epochs, 1)))
    elif name == "linear":
        factor = max(1 - t / epochs, 0.0)
    elif name == "onecycle":
        factor = _one_cycle(t / epochs)
    elif name == "none":
        factor = 1.0
    else:
        raise UserError(f"--scheduler {name}: choose step, cosine, linear, onecycle or none")
    # OneCycleLR rises from lr/25 on its own: a warm-up on top would hold it near 0 instead.
    if warmup_epochs and t < warmup_epochs and name != "onecycle":
        factor *= (t + 1e-3) / warmup_epochs
    return factor


# torch.optim.lr_scheduler.OneCycleLR's defaults: 30% of the run rising from lr/25, then down to
# lr/(25 * 1e4), both halves cosine-shaped (Smith & Topin 2017, "Super-convergence").
ONE_CYCLE_RISE, ONE_CYCLE_START, ONE_CYCLE_END = 0.3, 1 / 25, 1 / 25e4


def _one_cycle(progress):
    """OneCycleLR's multiplier at `progress` (0..1) of the run, as a pure function."""
    if progress < ONE_CYCLE_RISE:
        low, high, phase = ONE_CYCLE_START, 1.0, progress / ONE_CYCLE_RISE
    else:
        low, high, phase = 1.0, ONE_CYCLE_END, min((progress - ONE_CYCLE_RISE) / (1 - ONE_CYCLE_RISE), 1.0)
    return high + (low - high) * 0.5 * (1 + math.cos(math.pi * phase))


def config_lr_factor(t, config):
    """lr_factor of a TrainConfig's schedule after t epochs."""
    return lr_factor(t, config.scheduler, config.epochs, config.step_size, config.gamma, config.warmup_epochs)


def make_scheduler(optimizer, config, steps_per_epoch):
    """Stepped after every batch, so short runs and warm-up get a smooth schedule."""
    lr_factor(0, config.scheduler, config.epochs, config.step_size, config.gamma, 0)  # name check
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: config_lr_factor(step / steps_per_epoch, config))


def passes_per_epoch(images, batch_size, epochs, min_steps):
    """How many times each epoch goes over a train split of `images` images, so that `epochs`
    epochs make at least `min_steps` optimizer updates of `batch_size` images: 1 for a split
    big enough (the landmark source task: 32 batches x 20 epochs = 640 updates), more for a
    few hundred photos (250 images are 4 batches: 20 epochs of 8 passes). Counting the repeats
    inside an epoch keeps every epoch-based setting (schedule, warm-up, validation, patience,
    progressive resizing) meaning the same share of the run. The compute is bounded: at most
    about max(epochs x images, min_steps x batch_size) images trained on."""
    batches = math.ceil(images / batch_size)
    return max(1, math.ceil(min_steps / (epochs * batches)))


def train_size(epoch, epochs, min_size, image_size):
    """Progressive resizing: the side (px) trained on in `epoch` (1-based).

    Epochs 1 to round(0.75 * epochs) - 1 grow linearly from min_size towards image_size in
    steps of 8 px; from epoch round(0.75 * epochs) on, every epoch trains at image_size exactly,
    so the last quarter (at least the last epoch) has no train/test size gap. No epoch trains
    below min_size or above image_size. min_size 0 (or >= image_size): always image_size.
    """
    if not min_size or min_size >= image_size:
        return image_size
    ramp = round(0.75 * epochs) - 1
    if epoch > ramp:
        return image_size
    side = min_size + (image_size - min_size) * (epoch - 1) / ramp
    return max(min_size, min(image_size, round(side / 8) * 8))


def make_ema(model, decay, average_buffers=False):
    """The exponential moving average of `model`'s weights, or None (decay 0).

    Its buffers (BatchNorm statistics) follow `model`'s at each update, and before the average
    is validated or saved they are re-estimated for its own weights (reestimate_batchnorm).
    average_buffers=True averages them along with the weights instead (timm's ModelEmaV2, and
    this toolkit before): that is not consistent with the averaged weights, as a BatchNorm
    variance is quadratic in the weights before it, and in short runs the average keeps a large
    share of early steps, whose variances were far larger (measured: MobileNetV3-Small on the
    landmark target task validated at chance, 0.50, every probability near 0.52; re-estimated,
    0.93).
    """
    return AveragedModel(model, multi_avg_fn=_ema_update(decay), use_buffers=average_buffers) if decay else None


def batchnorm_layers(model, keep=()):
    """model's BatchNorm layers, except those inside the modules in `keep` (frozen stages)."""
    kept = {id(layer) for module in keep for layer in module.modules()}
    return [layer for layer in model.modules()
            if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm) and id(layer) not in kept]


@torch.no_grad()
def reestimate_batchnorm(model, batches, keep=()):
    """Recompute the running statistics of model's BatchNorm layers (but those in `keep`) as the
    plain mean over `batches`, an iterable of network inputs (float (B, 3, H, W) on the model's
    device), as torch.optim.swa_utils.update_bn does; the model is left in eval mode. Returns
    the number of images forwarded: 0 when there is no layer to re-estimate (and no pass runs).
    """
    layers = batchnorm_layers(model, keep)
    if not layers:
        return 0
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average over the batches
    model.eval()
    for layer in layers:
        layer.train()
    images = 0
    for x in batches:
        model(x)
        images += len(x)
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum
    model.eval()
    return images


def ema_weight(decay, t):
    """The share of the t-th weights (t = 1, 2, ...) in the bias-corrected average after t updates.

    The average after t updates is sum_i decay^(t-i) w_i / sum_i decay^(t-i) over the weights
    w_1..w_t after each step: an exponential average whose weights are normalised, Adam's bias
    correction (Kingma & Ba 2015, section 3) applied to weights. The weights before training get
    no share, so no decay warm-up is needed, and `decay` means the same from the first step on:
    0.9 averages about the last 10 steps, 0.999 nearly all of a short run. (An earlier warm-up,
    min(decay, (1 + t) / (10 + t)), reached 0.99 only after about 890 steps, so 0.9, 0.99 and
    0.999 gave identical weights in runs of a few hundred steps.)
    """
    return (1 - decay) / (1 - decay ** t)


def _ema_update(decay):
    """AveragedModel's update (it copies the weights itself at the first update, t = 1)."""
    @torch.no_grad()
    def update(averaged, current, n_averaged):
        if averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, ema_weight(decay, float(n_averaged) + 1))
        else:  # BatchNorm's step counters, with average_buffers
            torch._foreach_copy_(averaged, current)
    return update
