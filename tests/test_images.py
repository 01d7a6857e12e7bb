"""Decoding one image file (lib.images): damaged files of every format, and extreme shapes."""
import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from lib.images import IMAGE_SUFFIXES, PAD_FILL, RESAMPLE, BadImageError, decode_image


def writable_formats():
    """{suffix: a small valid file}, one suffix per format the toolkit reads and Pillow can also write."""
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8))
    files, formats = {}, set()
    for suffix in sorted(IMAGE_SUFFIXES):
        fmt = Image.registered_extensions()[suffix]
        if fmt in formats or fmt not in Image.SAVE:
            continue
        for mode in ("RGB", "L", "1"):  # the first mode the format can write
            buffer = io.BytesIO()
            try:
                rgb.convert(mode).save(buffer, format=fmt)
                decode_image(io.BytesIO(buffer.getvalue()), 8)
            except Exception:  # noqa: BLE001: this Pillow cannot write (or read back) it in this mode
                continue
            files[suffix] = buffer.getvalue()
            formats.add(fmt)
            break
    return files


def mutations(data):
    """Truncations, and each of the first 128 bytes (the header: DDS keeps its pixel format at 76-107) set
    to 0 and to 255."""
    yield from (data[:n] for n in (0, 1, 4, 8, 16, 32, 64, len(data) // 2, len(data) - 1))
    for position in range(min(128, len(data))):
        for value in (0x00, 0xFF):
            yield data[:position] + bytes([value]) + data[position + 1:]


@pytest.mark.filterwarnings("ignore")  # Pillow warns about odd TIFF tags and deprecated formats on the way
def test_damaged_files_of_every_format_are_bad_images_never_another_error(tmp_path):
    files = writable_formats()
    assert {"PNG", "JPEG", "DDS", "WEBP", "TIFF", "BMP", "GIF"} <= {Image.registered_extensions()[s] for s in files}
    escaped = {}  # the first error of each format that escaped as something else
    for suffix, data in files.items():
        for i, damaged in enumerate(mutations(data)):
            path = tmp_path / f"{i}{suffix}"
            path.write_bytes(damaged)
            try:
                decode_image(path, 8)
            except BadImageError as error:
                assert path.name in str(error)
            except Exception as error:  # noqa: BLE001: what the test is looking for
                escaped.setdefault(suffix, f"{suffix} #{i}: {type(error).__name__}: {error}")
    assert not escaped, "\n".join(escaped.values())


@pytest.mark.parametrize("shape", [(1, 1000), (1000, 1), (3, 700), (700, 3)], ids=str)
def test_pad_keeps_something_of_extreme_aspect_ratios(tmp_path, shape):
    """A 1000 x 1 strip at 64 px rounds to 0.064 rows: Pillow's ImageOps.pad gives black alone."""
    height, width = shape
    path = tmp_path / "strip.png"
    Image.new("RGB", (width, height), (200, 120, 40)).save(path)
    pixels = decode_image(path, 64, resize="pad")
    lit = (pixels != 0).any(axis=2)
    assert lit.any(), "the image vanished into the padding"
    rows, cols = np.nonzero(lit)
    long_side = np.ptp(cols if width > height else rows) + 1
    assert long_side == 64, "the strip still spans the long side"
    np.testing.assert_array_equal(pixels[rows[0], cols[0]], (200, 120, 40))


def test_pad_is_pillows_letterbox_for_every_other_shape(tmp_path):
    rng = np.random.default_rng(1)
    for width, height in [(160, 90), (90, 160), (640, 10), (64, 64), (33, 200)]:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        image.save(tmp_path / "photo.png")
        expected = np.asarray(ImageOps.pad(image, (64, 64), RESAMPLE, color=PAD_FILL))
        np.testing.assert_array_equal(decode_image(tmp_path / "photo.png", 64, resize="pad"), expected)
