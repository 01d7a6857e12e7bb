"""Compute per image, counted once per model and input size with torch.utils.flop_counter.

FLOPs are the same on every machine, unlike seconds: a reader turns them into minutes with
the GFLOP/s that bench/bench_train.py measures on their own CPU. A multiply-add counts as two
FLOPs (PyTorch's convention). Only convolutions, matrix products and the like are counted;
element-wise work (BatchNorm, ReLU, augmentation) is a few per cent and left out.
"""
import copy

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, conv_backward_flop

_BATCH = 2  # BatchNorm in training mode needs more than one image


def _grouped_conv_backward_flop(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                                output_padding, groups, output_mask, out_shape, **kwargs):
    """torch.utils.flop_counter's count of a convolution's backward, with the weight gradient of a
    grouped convolution divided by its groups: torch 2.14 counts that gradient as if the
    convolution were dense (its formula ignores `groups`), which made a depthwise 3x3 layer's
    backward 66 times its forward instead of 2 and MobileNetV3-Small's training step 34 times
    its inference. The input gradient is counted right (its formula uses the grouped weight).
    pytorch/pytorch PR #183405 makes the same division in the counter itself."""
    count = conv_backward_flop.__wrapped__
    common = (grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed, output_padding, groups)
    grad_input = count(*common, [output_mask[0], False, False], out_shape)
    grad_weight = count(*common, [False, output_mask[1], False], out_shape)
    return grad_input + grad_weight // groups


_CORRECTED = {torch.ops.aten.convolution_backward: _grouped_conv_backward_flop}


def _plain_copy(model, device):
    """A float32 copy on `device` to count on, with any SyncBatchNorm (torchrun --sync-bn) turned
    back into BatchNorm2d: SyncBatchNorm cannot run on CPU inside a process group, and both count
    the same (element-wise work is not counted)."""
    scratch = copy.deepcopy(model).to(device).float()
    for name, module in list(scratch.named_modules()):
        if isinstance(module, torch.nn.SyncBatchNorm):
            plain = torch.nn.BatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                         module.track_running_stats)
            plain.load_state_dict(module.state_dict())
            for copied, original in zip(plain.parameters(), module.parameters()):
                copied.requires_grad_(original.requires_grad)
            scratch.set_submodule(name, plain.train(module.training))
    return scratch


def _count(run):
    """FLOPs of run() per image. Dropout and stochastic depth draw from torch's global generator
    in a training-mode pass; it runs on a forked generator, so counting draws nothing from the
    training's random stream (a resumed process counts again, and must repeat the same run)."""
    with torch.random.fork_rng(devices=[]), FlopCounterMode(display=False, custom_mapping=_CORRECTED) as counter:
        run()
    return counter.get_total_flops() / _BATCH


def _device(model):
    """Counted on the CPU, or on the meta device for a model built there (lib.models.meta_device):
    the count depends on shapes only."""
    return torch.device("meta") if next(model.parameters()).is_meta else torch.device("cpu")


def training_flops(model, image_size, num_classes):
    """FLOPs of one training image: forward and backward as the model is set up (frozen
    stages at the input side need no backward, so they cost a forward only)."""
    device = _device(model)
    scratch = _plain_copy(model, device).train()
    x = torch.zeros(_BATCH, 3, image_size, image_size, device=device)
    y = torch.zeros(_BATCH, dtype=torch.int64, device=device) % num_classes
    return _count(lambda: F.cross_entropy(scratch(x), y).backward())


def inference_flops(model, image_size):
    """FLOPs of classifying one image (eval mode, forward only)."""
    device = _device(model)
    scratch = _plain_copy(model, device).eval()
    x = torch.zeros(_BATCH, 3, image_size, image_size, device=device)
    with torch.no_grad():
        return _count(lambda: scratch(x))
