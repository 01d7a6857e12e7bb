"""The pixel cache (lib.pixel_cache): read back without decoding, with the statistics; a changed,
added or removed file invalidates an entry; a run killed while writing leaves nothing trusted; one
writer at a time; worker processes decode the same pixels; the same weights with and without it.
It serves only pixels that the files on disk give now: files rewritten in place behind their
modification time, and decode failures that have passed."""
import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, SCRIPT_ENV, run_main
from lib import pixel_cache
from lib.checkpoint import load_checkpoint
from lib.data import channel_stats, load_split
from lib.images import BadImageError
from lib.pixel_cache import Decoding, load_pixels
from test_data import imagefolder, photo


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


def folder_dataset(root, count=6):
    return imagefolder(root, {f"{i}.png": lambda p, i=i: Image.fromarray(photo(i, 48)).save(p) for i in range(count)})


def entries(cache):
    return sorted(p.name for p in cache.rglob("*") if p.is_file() and p.name != ".lock")


def test_cache_is_read_back_without_decoding_and_holds_the_statistics(tmp_path, monkeypatch):
    data, cache = folder_dataset(tmp_path / "d"), tmp_path / "cache"
    first = load_split(data, "val", image_size=32, cache_dir=cache)
    assert len(entries(cache)) == 2, entries(cache)  # CONTENT.u8 and CONTENT.json
    monkeypatch.setattr(pixel_cache, "decode_image", lambda *a: pytest.fail("decoded again"))
    second = load_split(data, "val", image_size=32, cache_dir=cache)
    assert torch.equal(first.images, second.images) and first.filenames == second.filenames
    [pixels] = [name for name in entries(cache) if name.endswith(".u8")]
    assert pixels in Path("/proc/self/maps").read_text(), "the images are a memory map of the cached file"
    reference = second.images.double() / 255
    assert second.mean == pytest.approx(reference.mean(dim=(0, 2, 3)).tolist(), abs=1e-12)
    assert second.std == pytest.approx(reference.std(dim=(0, 2, 3)).tolist(), abs=1e-12)
    assert channel_stats(second.images) == (second.mean, second.std)
    monkeypatch.undo()
    uncached = load_split(data, "val", image_size=32, cache_dir=None)
    assert torch.equal(uncached.images, first.images)
    other = load_split(data, "val", image_size=32, resize="crop", cache_dir=cache)
    assert len(entries(cache)) == 4, "decoding settings have an entry each"
    assert torch.equal(other.images, first.images), "square photos: crop is squash"


@pytest.mark.parametrize("change", ["changed", "added", "removed"])
def test_a_changed_added_or_removed_file_invalidates_the_cache(tmp_path, change):
    data, cache = folder_dataset(tmp_path / "d"), tmp_path / "cache"
    before = load_split(data, "val", image_size=32, cache_dir=cache)
    folder = data / "val"
    if change == "changed":
        Image.fromarray(photo(99, 48)).save(folder / "2.png")
        os.utime(folder / "2.png", ns=(0, os.stat(folder / "2.png").st_mtime_ns + 10**9))
    elif change == "added":
        Image.fromarray(photo(99, 48)).save(folder / "9.png")
    else:
        (folder / "2.png").unlink()
    after = load_split(data, "val", image_size=32, cache_dir=cache)
    assert after.filenames == sorted(str(p.relative_to(data)) for p in folder.iterdir())
    assert torch.equal(after.images, load_split(data, "val", image_size=32, cache_dir=None).images)
    if change == "changed":
        assert not torch.equal(after.images[2], before.images[2])
    assert len(entries(cache)) == 2, "the stale entry was replaced, not kept beside"


# The subprocesses use lib.pixel_cache alone (torch-free, so they start fast): the guarantees are its own.
KILLER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from lib import pixel_cache
def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
real = getattr(pixel_cache, {target!r})
def wrapper(*args, **kwargs):
    real(*args, **kwargs)  # the images decoded into the temporary file, then killed
    killed()
setattr(pixel_cache, {target!r}, {replacement})
pixel_cache.load_pixels({files!r}, pixel_cache.Decoding(32), {cache!r}, identity="photos")
"""


def photo_files(root, count=6):
    return sorted(str(p) for p in (folder_dataset(root, count) / "val").iterdir())


@pytest.mark.parametrize("when", ["while decoding", "before the sidecar"])
def test_a_run_killed_while_writing_the_cache_leaves_nothing_trusted(tmp_path, monkeypatch, when):
    files, cache = photo_files(tmp_path / "d"), tmp_path / "cache"
    target, replacement = ("_decode_chunk", "wrapper") if when == "while decoding" else ("write_json", "killed")
    script = KILLER.format(repo=str(REPO), target=target, replacement=replacement, files=files, cache=str(cache))
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, **SCRIPT_ENV}, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = entries(cache)
    assert left and not any(name.endswith(".json") for name in left), left  # pixels, but no sidecar
    decoded = []
    real = pixel_cache.decode_image
    monkeypatch.setattr(pixel_cache, "decode_image", lambda *a: decoded.append(a) or real(*a))
    pixels = pixel_cache.load_pixels(files, pixel_cache.Decoding(32), cache, identity="photos")
    assert len(decoded) == 6, "the killed run's pixels must not be used"
    np.testing.assert_array_equal(pixels.images, pixel_cache.load_pixels(files, pixel_cache.Decoding(32), None).images)
    assert len(entries(cache)) == 2 and not any(n.endswith(".tmp") for n in entries(cache)), entries(cache)


def test_one_writer_at_a_time(tmp_path):
    """A process that finds the entry's lock taken waits for it (torchrun ranks, two scripts)."""
    files, cache = photo_files(tmp_path / "d"), tmp_path / "cache"
    pixel_cache.load_pixels(files, pixel_cache.Decoding(32), cache, identity="photos")
    [lock] = cache.glob("*/.lock")
    for name in entries(cache):
        next(cache.rglob(name)).unlink()  # the entry is gone: the next reader must write it
    fd = os.open(lock, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    script = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from lib import pixel_cache; print(len(pixel_cache."
              f"load_pixels({files!r}, pixel_cache.Decoding(32), {str(cache)!r}, identity='photos').kept))")
    waiting = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, **SCRIPT_ENV})
    try:
        line = ""
        while line is not None and "waiting for another process decoding" not in line:
            line = waiting.stderr.readline() or None  # None: it ended without waiting
        assert line, waiting.communicate()
        assert waiting.poll() is None and entries(cache) == [], "it must not write while the lock is held"
    finally:
        os.close(fd)
    out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0 and out.strip() == "6", err
    assert len(entries(cache)) == 2


def test_decoding_in_worker_processes_gives_the_same_pixels(tmp_path, monkeypatch):
    data = folder_dataset(tmp_path / "d", count=10)
    (data / "val" / "3.png").write_bytes(b"broken")
    alone = load_split(data, "val", image_size=32, skip_bad_images=True, cache_dir=None)
    monkeypatch.setattr(pixel_cache, "MIN_PER_WORKER", 1)
    monkeypatch.setattr(pixel_cache, "CHUNK", 3)
    monkeypatch.setattr(pixel_cache, "_usable_cpus", lambda: 2)
    pooled = load_split(data, "val", image_size=32, skip_bad_images=True, cache_dir=tmp_path / "cache")
    assert pooled.filenames == alone.filenames and "val/3.png" not in pooled.filenames
    assert torch.equal(pooled.images, alone.images) and (pooled.mean, pooled.std) == (alone.mean, alone.std)


def test_same_seed_gives_identical_weights_with_and_without_the_cache(demo_data, tmp_path):
    def weights(*extra):
        out = tmp_path / f"run{len(extra)}"
        run_main("train.py", "--data", demo_data, "--task", "target", "--model", "cnn3", "--epochs", "1",
                 "--out", out, *extra)
        return load_checkpoint(out / "last.pt")["state_dict"]
    cached, uncached = weights(), weights("--no-pixel-cache")
    assert cached.keys() == uncached.keys()
    assert all(torch.equal(cached[k], uncached[k]) for k in cached)
