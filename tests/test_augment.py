"""lib.augment: per-image randomness in a batched call, crops inside the image and of the
asked-for area, the erased box, and determinism for a seed."""
import pytest
import torch

from lib.augment import Preset, augment_batch


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def _photo(n=1, size=32, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=_generator(seed))


@pytest.mark.parametrize("preset", ["light", "standard", "strong"])
def test_each_image_of_a_batch_gets_its_own_parameters(preset):
    # One image repeated 16 times: a batched call drawing one set of parameters (what
    # torchvision's v2 transforms do) would return 16 equal images.
    out = augment_batch(_photo().expand(16, -1, -1, -1), preset, _generator())
    assert out.shape == (16, 3, 32, 32) and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1
    flat = out.flatten(1)
    assert torch.cdist(flat, flat).fill_diagonal_(float("inf")).min() > 0, "two images were augmented alike"


def test_the_same_seed_gives_the_same_batch_and_another_seed_another():
    images = _photo(8)
    first = augment_batch(images, "strong", _generator(3))
    assert torch.equal(first, augment_batch(images, "strong", _generator(3)))
    assert not torch.equal(first, augment_batch(images, "strong", _generator(4)))
    assert torch.equal(augment_batch(images, "none", _generator(3)), images.float() / 255)


def test_crops_stay_inside_the_image_and_cover_the_asked_area():
    """An image whose pixel values are their own coordinates: a crop shows a sub-range of each
    ramp, increasing (a crop reaching outside would be folded back by the reflection padding)
    and as wide as the crop (area 0.25 at aspect ratio 1: half the width and half the height)."""
    size = 64
    ramp = torch.arange(size, dtype=torch.float32) * 4  # 0..252, exact in uint8
    image = torch.stack([ramp.view(1, -1).expand(size, size), ramp.view(-1, 1).expand(size, size),
                         torch.zeros(size, size)]).to(torch.uint8)
    crop_only = Preset(crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0))
    out = augment_batch(image.expand(64, -1, -1, -1), crop_only, _generator()) * 255 / 4  # in pixels
    x, y = out[:, 0], out[:, 1]
    assert (x.diff(dim=2) >= -1e-3).all() and (y.diff(dim=1) >= -1e-3).all(), "a crop left the image"
    assert x.min() >= -1e-3 and x.max() <= size - 1 + 1e-3
    width = x[:, :, -1] - x[:, :, 0]   # pixel centres span (size - 1) / size of the crop's width
    height = y[:, -1, :] - y[:, 0, :]
    expected = 0.5 * (size - 1)
    assert torch.allclose(width, torch.full_like(width, expected), atol=1.0)
    assert torch.allclose(height, torch.full_like(height, expected), atol=1.0)
    starts = x[:, 0, 0]
    assert starts.max() - starts.min() > size / 4, "crops should be placed at random"


def test_erasing_fills_one_box_of_two_to_twenty_percent_of_the_image():
    size, n = 64, 32
    images = _photo(n, size, seed=1)
    out = augment_batch(images, Preset(erase=1.0), _generator(2))
    changed = (out - images.float() / 255).abs().amax(dim=1) > 1e-4
    for i in range(n):
        rows, cols = changed[i].any(1).nonzero().flatten(), changed[i].any(0).nonzero().flatten()
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        box = out[i, :, top:bottom, left:right]
        # One filled rectangle: everything changed lies in it, and it holds one colour.
        assert changed[i].sum() <= (bottom - top) * (right - left)
        assert torch.allclose(box, box[:, :1, :1].expand_as(box))
        area = float((bottom - top) * (right - left)) / size ** 2
        edge = 2 * (bottom - top + right - left) / size ** 2  # a pixel's rounding at each side
        assert 0.02 - edge <= area <= 0.2 + edge, f"image {i}: erased {area:.3f} of the image"

