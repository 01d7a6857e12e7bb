"""The pixel cache (lib.pixel_cache) serves only pixels that the files on disk give now: files
rewritten in place behind their modification time, and decode failures that have passed."""
import os

import numpy as np
from PIL import Image

from lib import pixel_cache
from lib.data import channel_stats, load_split
from lib.images import BadImageError
from lib.pixel_cache import Decoding, load_pixels


def bmp_files(folder, count=4, size=24):
    """Uncompressed BMPs: a file of the same size whatever its pixels, so a rewrite keeps the size."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{i}.bmp"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_a_file_rewritten_in_place_with_its_mtime_put_back_is_decoded_again(tmp_path):
    # What touch -r, cp -p, rsync -t --inplace and exiftool -P do: same path, inode, size and mtime.
    files, cache = bmp_files(tmp_path / "photos"), tmp_path / "cache"
    load_pixels(files, Decoding(24), cache, identity="photos")
    before = os.stat(files[1])
    new = np.full((24, 24, 3), 7, np.uint8)
    Image.fromarray(new).save(tmp_path / "new.bmp")
    with open(files[1], "r+b") as f:  # in place: the same inode
        f.write((tmp_path / "new.bmp").read_bytes())
    os.utime(files[1], ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(files[1])
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    assert after.st_ctime_ns != before.st_ctime_ns, "the premise: the kernel moved the status-change time"
    pixels = load_pixels(files, Decoding(24), cache, identity="photos")
    np.testing.assert_array_equal(pixels.images[1], new.transpose(2, 0, 1))


def test_a_transient_decode_failure_is_not_replayed_from_the_cache(tmp_path, monkeypatch):
    """An I/O error on one read (or a permission fixed since: chmod moves the ctime, which the key
    holds too) must not keep the image out of every later run. Simulated here by a decoder that
    fails once for one file: the tests run as root, whom chmod 000 does not stop."""
    files, cache = bmp_files(tmp_path / "photos"), tmp_path / "cache"
    real = pixel_cache.decode_image

    def fails_on_file_2(path, *args):
        if str(path) == files[2]:
            raise BadImageError(f"{path}: not a readable image ([Errno 5] Input/output error)")
        return real(path, *args)

    monkeypatch.setattr(pixel_cache, "decode_image", fails_on_file_2)
    failed = load_pixels(files, Decoding(24), cache, identity="photos")
    assert failed.kept == [0, 1, 3] and "Input/output error" in failed.skipped[0]
    # Still failing: served from the cache, and only the failed file is tried again.
    tried = []
    monkeypatch.setattr(pixel_cache, "decode_image", lambda path, *a: tried.append(path) or fails_on_file_2(path, *a))
    again = load_pixels(files, Decoding(24), cache, identity="photos")
    assert again.kept == [0, 1, 3] and tried == [files[2]]
    monkeypatch.setattr(pixel_cache, "decode_image", real)  # the disk is fine again
    healed = load_pixels(files, Decoding(24), cache, identity="photos")
    assert healed.kept == [0, 1, 2, 3] and healed.skipped == []
    np.testing.assert_array_equal(healed.images, load_pixels(files, Decoding(24), None).images)
    assert len([p for p in (cache).rglob("*") if p.is_file() and p.name != ".lock"]) == 2, "one entry, replaced"


def test_a_channel_without_spread_gets_std_one(tmp_path):
    # Every pixel's blue is 0: std 0 would make every input NaN ("training diverged" at any --lr).
    folder = tmp_path / "d" / "train"
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for i in range(3):
            rgb = np.random.default_rng(hash((label, i)) % 2**32).integers(0, 256, (16, 16, 3), dtype=np.uint8)
            rgb[..., 2] = 0
            Image.fromarray(rgb).save(folder / label / f"{i}.png")
    split = load_split(tmp_path / "d", "train", image_size=16, cache_dir=None)
    assert split.std[2] == 1.0 and split.mean[2] == 0.0 and all(0 < s < 1 for s in split.std[:2])
    assert channel_stats(split.images) == (split.mean, split.std)
    assert load_split(tmp_path / "d", "train", image_size=16, cache_dir=tmp_path / "cache").std == split.std
