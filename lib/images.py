"""Decoding one image file to RGB pixels, shared by training, evaluation, explanation and predict.py.

Torch-free on purpose: predict.py runs on devices without PyTorch and must decode exactly as
training did. In order, decode_image:
1. refuses an image of more than `max_pixels` pixels (a decompression bomb: a small file that
   decodes to gigabytes) before decoding it. Pillow's own guard is turned off below in favour of
   this one, which names the file and the flag, and has no warning to spam;
2. decodes a JPEG at least twice as large as `size` in Pillow's draft mode (libjpeg's DCT
   scaling by 1/2, 1/4 or 1/8, to a side still >= `size`): much faster than a full decode;
3. turns the photo upright as its EXIF Orientation tag says (phones store photos sideways);
4. converts any mode to 8-bit RGB (to_rgb8: 16-bit, 32-bit and float images on a stated scale);
5. brings it to size x size by the resize policy, with bilinear resampling (Pillow's, which
   antialiases when shrinking): squash (resize, ignoring the aspect ratio); crop (the centred
   square of side min(width, height), at offsets ((width - side) // 2, (height - side) // 2),
   then resize); pad (letterbox, Pillow's ImageOps.pad: resize so the long side fits, then paste
   centred on PAD_FILL; a side that would shrink to 0 px keeps 1 px, so no image becomes fill alone).
"""
import os

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lib.errors import UserError
from lib.preprocessing import DEFAULT_RESIZE, check_resize

# Pillow's default MAX_IMAGE_PIXELS (about 0.25 GiB of 24-bit pixels): the default limit here too.
DEFAULT_MAX_PIXELS = 89_478_485
Image.MAX_IMAGE_PIXELS = None  # decode_image checks the limit itself (see the module docstring)

PAD_FILL = (0, 0, 0)  # black, as torchvision's Pad and Pillow's ImageOps.pad fill by default
RESAMPLE = Image.Resampling.BILINEAR
# Bump when decode_image gives other pixels for the same file and settings: decoded pixels
# cached on disk (lib.pixel_cache) are keyed on it and on Pillow's version.
DECODER_VERSION = 3

# Every extension Pillow can open (not those it can only write), e.g. .jpg, .jfif, .jpe, .png, .webp.
IMAGE_SUFFIXES = frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


class BadImageError(UserError):
    """An image file that cannot be decoded; the message names the file."""


def is_image_name(path):
    """Whether a file name has an extension Pillow reads (case-insensitive)."""
    return os.path.splitext(str(path))[1].lower() in IMAGE_SUFFIXES


def median_short_side(paths):
    """The median of min(width, height) in px over the files in `paths`, read from their headers
    (Pillow opens lazily: nothing is decoded); files that cannot be opened are left out; None when
    none can. EXIF orientation swaps width and height only, so the short side needs no turning."""
    sides = []
    for path in paths:
        try:
            with Image.open(path) as image:
                sides.append(min(image.size))
        except Exception:  # noqa: BLE001 - an unreadable file is decode_image's to report
            continue
    return int(np.median(sides)) if sides else None


def decode_image(path, size, resize=DEFAULT_RESIZE, max_pixels=DEFAULT_MAX_PIXELS):
    """Read `path` as a (size, size, 3) uint8 RGB array (see the module docstring for the steps).

    max_pixels: the largest width x height accepted; 0 or None accepts any size.
    Raises BadImageError (naming the file, and for a symbolic link where it points) for a file
    that is missing, unreadable, not an image, damaged (whatever Pillow raises) or over the limit.
    """
    check_resize(resize)
    try:
        with Image.open(path) as image:
            pixels = image.width * image.height
            if max_pixels and pixels > max_pixels:
                raise BadImageError(f"{_describe(path)}: {image.width} x {image.height} = {pixels:,} pixels, over "
                                    f"the limit of {max_pixels:,} against decompression bombs; "
                                    "--max-image-pixels N allows larger images")
            image.draft("RGB", (size, size))
            rgb = to_rgb8(ImageOps.exif_transpose(image))
    except BadImageError:
        raise
    except FileNotFoundError:
        raise BadImageError(f"{_describe(path)}: image file not found") from None
    except UnidentifiedImageError as error:
        raise BadImageError(f"{_describe(path)}: not a readable image ({error})") from None
    except Exception as error:  # noqa: BLE001
        # A damaged file makes Pillow's plugins raise nearly anything (NotImplementedError for a
        # .dds header, RuntimeError for .avif, struct.error, IndexError...): its own fuzzing harness
        # accepts any Exception. Ours are only the checks above.
        raise BadImageError(f"{_describe(path)}: not a readable image ({type(error).__name__}: {error})") from None
    return np.asarray(_to_square(rgb, size, resize), dtype=np.uint8)


def to_rgb8(image):
    """Any Pillow image as 8-bit RGB.

    - 16-bit grayscale (I;16, I;16B, ...) and 32-bit integer (I) images: the 16-bit scale,
      0..65535 -> 0..255 (value / 257, rounded; values outside are clipped). So a 16-bit photo
      gives its 8-bit copy's pixels within 1 (8-bit x 257 is the 16-bit value, PNG's rule for
      scaling sample depths). Pillow opens 16-bit grayscale PNG, TIFF and PGM files in these modes.
    - 32-bit float (F): the 0..1 scale (clipped), the convention of float images in scikit-image
      and OpenCV.
    - Everything else as Pillow's convert("RGB"): 1-bit becomes 0 or 255, grayscale three equal
      channels, palettes their colours, alpha is dropped. Pillow reads 16-bit RGB and RGBA PNGs
      as 8-bit already (the high byte of each sample).
    """
    if image.mode == "F" or image.mode == "I" or image.mode.startswith("I;16"):
        scale = 255.0 if image.mode == "F" else 1 / 257
        gray = np.clip(np.rint(np.asarray(image, dtype=np.float64) * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    return image.convert("RGB")


def _to_square(image, size, resize):
    if resize == "crop":
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if resize == "pad":
        return _pad(image, size)
    return image if image.size == (size, size) else image.resize((size, size), RESAMPLE)


def _pad(image, size):
    """ImageOps.pad to size x size, except that the content keeps at least one row (column): Pillow
    rounds the short side of a 1000 x 1 image at 64 px to 0 rows and returns the fill alone."""
    if round(min(image.size) / max(image.size) * size) == 0:  # Pillow's own rounding (ImageOps.contain)
        image = image.resize((size, 1) if image.width > image.height else (1, size), RESAMPLE)
    return ImageOps.pad(image, (size, size), RESAMPLE, color=PAD_FILL)


def _describe(path):
    """The path, and where it points when it is a symbolic link (a link the user placed is followed)."""
    if os.path.islink(path):
        target = os.readlink(path)
        missing = "" if os.path.exists(path) else ", which does not exist"
        return f"{path} (a symbolic link to {target}{missing})"
    return str(path)
