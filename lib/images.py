"""Decoding one image file to RGB pixels, shared by training and edge inference.

Torch-free on purpose: predict.py runs on devices without PyTorch and must resize exactly
as training did.
"""
import numpy as np
from PIL import Image, UnidentifiedImageError

from lib.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
RESAMPLE = Image.Resampling.BILINEAR


class BadImageError(UserError):
    """An image file that cannot be decoded; the message names the file."""


def decode_image(path, size):
    """Read `path` as a (size, size, 3) uint8 array: any mode becomes RGB, any size is resized."""
    try:
        with Image.open(path) as image:
            image.load()
            rgb = image.convert("RGB")
    except FileNotFoundError:
        raise BadImageError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise BadImageError(f"{path}: not a readable image ({error})") from None
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), RESAMPLE)
    return np.asarray(rgb, dtype=np.uint8)
