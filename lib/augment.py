"""Named augmentation presets, applied to whole uint8 batches with per-image randomness.

torchvision.transforms.v2 draws one set of random parameters per call, so a batched call
gives every image the same crop and jitter (pytorch/vision#8484). Looping over images in
Python would make augmentation the bottleneck, so each preset here draws per-image
parameters as tensors and applies them in a few batched ops: one affine_grid/grid_sample for
crop, scale, aspect, rotation and flip together, then colour jitter, grayscale and erasing.
Parameters come from a torch.Generator, so a seeded run (and a resumed one) is reproducible.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lib.inference import resize, scale_pixels


@dataclass(frozen=True)
class Preset:
    flip: float = 0.0            # probability of a horizontal flip
    crop_scale: tuple = (1.0, 1.0)   # area fraction of the random resized crop
    crop_ratio: tuple = (1.0, 1.0)   # aspect ratio range of the crop
    rotation: float = 0.0        # max degrees either way
    brightness: float = 0.0      # jitter factors drawn from [1 - x, 1 + x]
    contrast: float = 0.0
    saturation: float = 0.0
    grayscale: float = 0.0       # probability
    erase: float = 0.0           # probability of erasing one rectangle (2-20% of the area)


PRESETS = {
    "none": Preset(),
    "light": Preset(flip=0.5, crop_scale=(0.8, 1.0), crop_ratio=(0.9, 1.1)),
    "standard": Preset(flip=0.5, crop_scale=(0.5, 1.0), crop_ratio=(0.8, 1.25), rotation=10,
                       brightness=0.3, contrast=0.3, saturation=0.3, grayscale=0.1),
    "strong": Preset(flip=0.5, crop_scale=(0.35, 1.0), crop_ratio=(0.75, 1.33), rotation=20,
                     brightness=0.4, contrast=0.4, saturation=0.4, grayscale=0.2, erase=0.25),
}
_GRAY = torch.tensor([0.299, 0.587, 0.114])


def _uniform(n, low, high, generator):
    return low + (high - low) * torch.rand(n, generator=generator)


def augment_batch(images, preset, generator, size=None):
    """uint8 (N, 3, H, W) -> float (N, 3, size, size) in [0, 1], each image augmented independently.

    size (default: the images' own) lets progressive resizing train early epochs on smaller
    images; the affine resampling does the resize at no extra cost.
    """
    x = scale_pixels(images)
    p = PRESETS[preset] if isinstance(preset, str) else preset
    n = x.shape[0]
    size = size or x.shape[-1]
    if p == PRESETS["none"]:
        return resize(x, size)
    x = _affine(x, p, n, generator, size)
    x = _colour(x, p, n, generator)
    if p.erase:
        x = _erase(x, p.erase, n, generator)
    return x


def _affine(x, p, n, generator, size):
    area = _uniform(n, *p.crop_scale, generator)
    ratio = torch.exp(_uniform(n, math.log(p.crop_ratio[0]), math.log(p.crop_ratio[1]), generator))
    width = torch.sqrt(area * ratio).clamp(max=1)
    height = torch.sqrt(area / ratio).clamp(max=1)
    # Crop centres keep the crop inside the image (normalised coordinates run from -1 to 1).
    cx = _uniform(n, -1, 1, generator) * (1 - width)
    cy = _uniform(n, -1, 1, generator) * (1 - height)
    angle = torch.deg2rad(_uniform(n, -p.rotation, p.rotation, generator))
    flip = torch.where(torch.rand(n, generator=generator) < p.flip, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([
        torch.stack([width * flip * cos, -height * sin, cx], dim=1),
        torch.stack([width * flip * sin, height * cos, cy], dim=1),
    ], dim=1).to(x.device)
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _colour(x, p, n, generator):
    def factor(strength):
        return _uniform(n, 1 - strength, 1 + strength, generator).view(n, 1, 1, 1).to(x.device)

    gray_weights = _GRAY.view(1, 3, 1, 1).to(x.device)
    if p.brightness:
        x = x * factor(p.brightness)
    if p.contrast:
        mean = (x * gray_weights).sum(1, keepdim=True).mean(dim=(2, 3), keepdim=True)
        x = (x - mean) * factor(p.contrast) + mean
    if p.saturation:
        gray = (x * gray_weights).sum(1, keepdim=True)
        x = (x - gray) * factor(p.saturation) + gray
    if p.grayscale:
        gray = (x * gray_weights).sum(1, keepdim=True).expand_as(x)
        pick = (torch.rand(n, generator=generator) < p.grayscale).view(n, 1, 1, 1).to(x.device)
        x = torch.where(pick, gray, x)
    return x.clamp_(0, 1)


def _erase(x, probability, n, generator):
    h, w = x.shape[2:]
    area = _uniform(n, 0.02, 0.2, generator)
    ratio = torch.exp(_uniform(n, math.log(0.3), math.log(3.3), generator))
    eh = (torch.sqrt(area / ratio) * h).clamp(max=h)
    ew = (torch.sqrt(area * ratio) * w).clamp(max=w)
    y0 = torch.rand(n, generator=generator) * (h - eh)
    x0 = torch.rand(n, generator=generator) * (w - ew)
    fill = torch.rand(n, 3, generator=generator)
    on = torch.rand(n, generator=generator) < probability
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    box = ((rows >= y0.view(n, 1, 1)) & (rows < (y0 + eh).view(n, 1, 1)) &
           (cols >= x0.view(n, 1, 1)) & (cols < (x0 + ew).view(n, 1, 1)) & on.view(n, 1, 1))
    box = box.unsqueeze(1).to(x.device)
    return torch.where(box, fill.view(n, 3, 1, 1).to(x.device), x)

