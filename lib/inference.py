"""From uint8 pixels to class probabilities: the one input step, and batched prediction.

Every image a network sees passes through here: training's augmented batches through normalize
(lib.augment scales them with scale_pixels first), everything else through to_input, which the
exported ONNX graph (lib.onnx_export.PixelClassifier) traces as well. So validation, evaluate.py,
explain.py, the export check and a device all feed the network the same numbers.
"""
import torch
import torch.nn.functional as F


def scale_pixels(pixels):
    """uint8 pixels (any shape) -> float32 in [0, 1]; out of place, so a float input is left as it is."""
    return pixels.float().div(255)


def normalize(x, mean, std):
    """float images (N, 3, H, W) in [0, 1] -> the network's input, (x - mean) / std per channel.
    mean, std: 3 numbers each, or (1, 3, 1, 1) tensors (a module's buffers)."""
    return (x - _per_channel(mean, x)) / _per_channel(std, x)


def _per_channel(values, x):
    # A (1, 3, 1, 1) tensor is used as it is: a traced graph (the ONNX export) then reads the
    # module's buffer itself, keeping its name, instead of a reshaped copy.
    values = torch.as_tensor(values, dtype=x.dtype, device=x.device)
    return values if values.dim() == 4 else values.view(1, -1, 1, 1)


def resize(x, size):
    """float images (N, 3, H, W) -> (N, 3, size, size), bilinear with antialiasing; the images
    themselves when they already are that size (progressive resizing, a teacher of another size)."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def to_input(pixels, mean, std):
    """uint8 (N, 3, H, W) RGB pixels -> float32 network input: scale_pixels, then normalize."""
    return normalize(scale_pixels(pixels), mean, std)


@torch.no_grad()
def predict_probs(model, images, mean, std, device, batch_size=256, tta=False):
    """Class probabilities (N, C) float32 on the CPU for uint8 (N, 3, H, W) images, in eval mode;
    tta adds the horizontal mirror (the mean of both probabilities).

    Always float32: validation, evaluate.py, explain.py and the export check all see the
    same numbers for the same weights.
    """
    model.eval()
    out = None  # allocated once the first batch gives the class count (see lib.engine._train_epoch on why)
    for start in range(0, len(images), batch_size):
        x = to_input(images[start:start + batch_size].to(device), mean, std)
        probs = F.softmax(model(x).float(), dim=1)
        if tta:
            probs = (probs + F.softmax(model(x.flip(3)).float(), dim=1)) / 2
        if out is None:
            out = torch.empty(len(images), probs.shape[1])
        out[start:start + len(probs)] = probs.cpu()
    return out if out is not None else torch.empty(0)
