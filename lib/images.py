"""Decoding one image file to RGB pixels, shared by training, evaluation, explanation and predict.py.

Torch-free on purpose: predict.py runs on devices without PyTorch and must resize exactly
as training did. Photos from phones and cameras are often stored sideways with an EXIF
Orientation tag saying how to turn them upright; the tag is applied here, once, for every caller.
"""
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lib.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
RESAMPLE = Image.Resampling.BILINEAR


class BadImageError(UserError):
    """An image file that cannot be decoded; the message names the file."""


def decode_image(path, size):
    """Read `path` as a (size, size, 3) uint8 array, upright as its EXIF orientation says:
    any mode becomes RGB, any size is resized."""
    try:
        with Image.open(path) as image:
            image.load()
            rgb = ImageOps.exif_transpose(image).convert("RGB")
    except FileNotFoundError:
        raise BadImageError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise BadImageError(f"{path}: not a readable image ({error})") from None
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), RESAMPLE)
    return np.asarray(rgb, dtype=np.uint8)
