"""Decoded pixels on disk: a split is decoded once and memory-mapped by every later run.

One entry per (dataset, split, task, decoding settings) lives in its own folder under the cache
folder (default $XDG_CACHE_HOME/landmark-classification/pixels, ~/.cache/... without it):
CONTENT-TOKEN.u8, the uint8 pixels (N, 3, H, W) in the layout training uses, and CONTENT.json, the
sidecar: shape, which files were skipped and why, and the channel statistics. CONTENT is a hash
of the decoder (lib.images.DECODER_VERSION, Pillow's version), the settings and every file's
path, size, modification time, status-change time and inode, so a changed, added, removed or
re-linked file gives another name and the old entry is never read again (the next writer
deletes it). The status-change time (ctime) catches what the others miss: a file rewritten in
place at the same size with its modification time put back (touch -r, cp -p, rsync -t
--inplace, exiftool -P); the kernel sets it on every change and tools cannot set it back. It
also moves on a chmod, chown or new hard link, which then cost one decoding more.
A file that failed to decode is tried again whenever its entry is read, and if it decodes now
(an I/O error that passed, a permission fixed) the entry is written anew: a failure is never
replayed from the cache once its cause is gone.

Safety with several processes (torchrun ranks, two scripts at once) and kills:
- one writer per entry, under an flock on the folder's .lock; the others wait, then read;
- the pixels are decoded into a temporary file (space reserved up front, so a full disk is an
  error, not a SIGBUS), fsynced and renamed into place (os.replace); the sidecar is written
  (atomically) last, and only an entry with its sidecar is read. A killed writer leaves a
  temporary file that nothing reads and the next writer removes;
- a finished file is never written again, so no reader's memory map changes under it (files
  are deleted, never truncated: a process that mapped one keeps its pages).
Decoding runs in worker processes, each mapping only its slice of the output file by path (a
memory map pickled to a worker would be copied whole). Without a cache folder the same
decoding goes into a temporary file that is deleted once mapped.
"""
import fcntl
import hashlib
import json
import math
import multiprocessing
import os
import re
import secrets
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import PIL
from tqdm import tqdm

from lib.errors import UserError
from lib.files import cache_folder, write_json
from lib.images import DECODER_VERSION, DEFAULT_MAX_PIXELS, BadImageError, decode_image
from lib.preprocessing import DEFAULT_RESIZE

FORMAT = "landmark-classification-pixels/1"
DEFAULT = "default"     # load_pixels(cache_dir=DEFAULT): the default folder, default_folder()
CHUNK = 128             # images per task of a decoding worker
MIN_PER_WORKER = 512    # fewer images than this per extra process decode faster in this one


@dataclass(frozen=True)
class Decoding:
    """Everything besides the files that decoded pixels depend on (lib.images.decode_image's arguments)."""
    image_size: int
    resize: str = DEFAULT_RESIZE
    max_pixels: int | None = DEFAULT_MAX_PIXELS


@dataclass
class Pixels:
    images: np.ndarray   # (N, 3, H, W) uint8, memory-mapped; the decodable files in their order
    kept: list           # for each image, its index in the list of files
    skipped: list        # for each file that could not be decoded, why (the message names it)
    mean: list           # per channel, on the 0..1 scale, of `images`
    std: list            # per channel (n - 1 in the denominator, as torch.std)


def default_folder():
    return cache_folder() / "pixels"


def load_pixels(files, decoding, cache_dir=DEFAULT, identity="", label="images"):
    """The decoded pixels of `files` (paths, in order), from the cache or decoded now (and cached).

    cache_dir: a folder, DEFAULT (default_folder()), or None to decode without caching.
    identity: what the files are (e.g. dataset folder, split and task): one entry is kept per
    identity and decoding, replaced when the files change. label names them for people (the
    entry's folder, the progress bar). Files that cannot be decoded are left out and listed in
    .skipped; whether that is an error is the caller's decision. Raises UserError when the
    pixels cannot be written (the folder is not writable, the disk is full).
    """
    if cache_dir is None:
        try:
            return _decode_uncached(files, decoding, label)
        except OSError as error:
            raise UserError(f"cannot decode into a temporary file in {tempfile.gettempdir()} ({error}); "
                            "set TMPDIR to a folder with room, or use the pixel cache (--pixel-cache DIR)") from None
    folder = Path(default_folder() if cache_dir == DEFAULT else cache_dir)
    content = _content_key(files, decoding)
    slot = folder / _slot_name(identity, label, decoding)
    found = _read_entry(slot, content)
    if found and not _any_decodes_now(files, found, decoding):
        return found
    try:
        slot.mkdir(parents=True, exist_ok=True)
        with _locked(slot / ".lock", label):
            # Another process may have written it while this one waited for the lock.
            found = _read_entry(slot, content)
            if not found or _any_decodes_now(files, found, decoding):
                found = _write_entry(slot, content, files, decoding, identity, label)
    except OSError as error:
        raise UserError(f"--pixel-cache {folder}: cannot write decoded pixels there ({error}); choose "
                        "another folder with --pixel-cache DIR, or turn the cache off with --no-pixel-cache") from None
    return found


def pixel_counts(images):
    """(3, 256) int64: how many pixels of each channel have each value, in uint8 images (3, H, W)
    or (N, 3, H, W)."""
    flat = np.moveaxis(np.asarray(images), -3, 0).reshape(3, -1)
    return np.stack([np.bincount(channel, minlength=256) for channel in flat]).astype(np.int64)


def stats_from_counts(counts):
    """Per-channel mean and standard deviation (n - 1 denominator) on the 0..1 scale, from
    pixel_counts: sums of integers, exact, then one rounding each (no float copy of the pixels).

    A channel with no spread (one value in every pixel: exactly 0 in these integer sums) gets
    std 1.0, as scikit-learn's StandardScaler does: normalising divides by the std, and 0 would
    turn every input into NaN. The channel is then only centred."""
    values = np.arange(256, dtype=np.int64)
    mean, std = [], []
    for channel in np.asarray(counts, dtype=np.int64):
        n, s1, s2 = int(channel.sum()), int(channel @ values), int(channel @ (values * values))
        mean.append(s1 / (255 * n) if n else float("nan"))
        std.append(_std(n, n * s2 - s1 * s1))
    return mean, std


def _std(n, spread):
    """The std of n values on the 0..1 scale from n * sum(v^2) - sum(v)^2 over values v in 0..255."""
    if n < 2:
        return float("nan")
    return math.sqrt(spread / (n * (n - 1) * 255 * 255)) if spread else 1.0


# --- entries -------------------------------------------------------------------------------------

def _content_key(files, decoding):
    """A hash of what the pixels depend on: decoder, settings, and each file's path, size,
    modification time, status-change time and inode (of the file a symbolic link points to)."""
    listing = []
    for path in files:
        try:
            st = os.stat(path)
            listing.append([str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
        except OSError:
            listing.append([str(path), None])
    text = json.dumps([FORMAT, DECODER_VERSION, PIL.__version__, asdict(decoding), listing])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _any_decodes_now(files, pixels, decoding):
    """Whether a file the entry left out decodes now: its failure was transient (an I/O error, a
    permission since fixed), and the entry must not replay it. Tries only the failed files."""
    for index in np.setdiff1d(np.arange(len(files)), pixels.kept).tolist():
        try:
            decode_image(files[index], decoding.image_size, decoding.resize, decoding.max_pixels)
        except BadImageError:
            continue
        return True
    return False


def _slot_name(identity, label, decoding):
    digest = hashlib.sha256(json.dumps([identity, asdict(decoding)]).encode()).hexdigest()[:16]
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{label}-{decoding.image_size}px-{decoding.resize}")
    return f"{readable.strip('-.')[:80]}-{digest}"


def _read_entry(slot, content):
    """The finished entry `content` in `slot`, memory-mapped (copy-on-write: writes stay private), or None."""
    try:
        meta = json.loads((slot / f"{content}.json").read_text())
        if meta.get("format") != FORMAT or meta.get("content") != content:
            return None
        shape = tuple(meta["shape"])
        data = slot / _data_name(content, meta["data"])
        if data.stat().st_size != math.prod(shape):
            return None
        images = np.memmap(data, np.uint8, "c", shape=shape) if shape[0] else np.zeros(shape, np.uint8)
        skipped = dict(meta["skipped"])
        kept = [i for i in range(meta["files"]) if i not in skipped]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return Pixels(images, kept, list(skipped.values()), meta["mean"], meta["std"])


def _write_entry(slot, content, files, decoding, identity, label):
    """Decode into a temporary file, rename it into place, then write the sidecar that makes it count."""
    _remove_all_but_lock(slot)
    tmp = slot / f".{content}.{os.getpid()}.tmp"
    # A name of its own for every write: an entry written again (a failed file that decodes now)
    # never replaces the pixels a reader of the previous one may be mapping.
    data = f"{content}-{secrets.token_hex(4)}.u8"
    try:
        kept, bad, counts = _decode_into(tmp, files, decoding, label)
        os.replace(tmp, slot / data)
    finally:
        tmp.unlink(missing_ok=True)
    mean, std = stats_from_counts(counts)
    write_json({"format": FORMAT, "content": content, "data": data, "identity": identity, "decoding": asdict(decoding),
                "shape": [len(kept), 3, decoding.image_size, decoding.image_size], "files": len(files),
                "skipped": bad, "mean": mean, "std": std}, slot / f"{content}.json")
    return _read_entry(slot, content)


def _data_name(content, name):
    """The sidecar's pixel file, checked to be one of this entry's files in the same folder."""
    if not (isinstance(name, str) and name.startswith(f"{content}-") and name.endswith(".u8") and "/" not in name):
        raise ValueError(f"not a pixel file of entry {content}: {name!r}")
    return name


def _remove_all_but_lock(slot):
    """Under the lock no one else writes here: what is left is a killed writer's temporary file
    or an entry for files that have since changed (a reader that mapped it keeps its pages)."""
    for path in slot.iterdir():
        if path.name != ".lock":
            path.unlink(missing_ok=True)


@contextmanager
def _locked(path, label):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process decoding {label} ({path.parent})", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock; a killed process's lock is released by the kernel


def _decode_uncached(files, decoding, label):
    fd, tmp = tempfile.mkstemp(prefix="landmark-pixels-", suffix=".u8")
    os.close(fd)
    try:
        kept, bad, counts = _decode_into(Path(tmp), files, decoding, label)
        shape = (len(kept), 3, decoding.image_size, decoding.image_size)
        images = np.memmap(tmp, np.uint8, "c", shape=shape) if kept else np.zeros(shape, np.uint8)
    finally:
        os.unlink(tmp)  # the memory map keeps the pages; the name goes now
    return Pixels(images, kept, [message for _, message in bad], *stats_from_counts(counts))


# --- decoding ------------------------------------------------------------------------------------

def _decode_into(path, files, decoding, label):
    """Decode `files` into the file at `path` as uint8 (N, 3, size, size), leaving out the files
    that cannot be decoded; fsynced. Returns (kept indices, [(index, message)] of the files left
    out, pixel counts of the kept images)."""
    side = decoding.image_size
    row = 3 * side * side
    with open(path, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, len(files) * row)
    chunks = [(start, files[start:start + CHUNK]) for start in range(0, len(files), CHUNK)]
    workers = min(_usable_cpus(), len(files) // MIN_PER_WORKER, len(chunks))
    bad, counts = [], np.zeros((3, 256), np.int64)
    with tqdm(total=len(files), desc=f"decoding {label}", unit="img", file=sys.stderr, disable=None,
              leave=False) as bar:
        if workers > 1:
            # fork: the workers need only numpy and Pillow, already loaded here; spawn and
            # forkserver would import the calling script, and with it torch, in every worker.
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
                jobs = [pool.submit(_decode_chunk, str(path), side, start, [str(p) for p in chunk], decoding)
                        for start, chunk in chunks]
                results = (job.result() for job in as_completed(jobs))
                for done, chunk_bad, chunk_counts in results:
                    bad += chunk_bad
                    counts += chunk_counts
                    bar.update(done)
        else:
            for start, chunk in chunks:
                done, chunk_bad, chunk_counts = _decode_chunk(str(path), side, start, chunk, decoding)
                bad += chunk_bad
                counts += chunk_counts
                bar.update(done)
    bad.sort()
    skipped = {index for index, _ in bad}
    kept = [i for i in range(len(files)) if i not in skipped]
    if bad:
        _close_gaps(path, kept, row)
    with open(path, "r+b") as f:
        f.truncate(len(kept) * row)
        os.fsync(f.fileno())
    return kept, bad, counts


def _decode_chunk(out_path, side, start, paths, decoding):
    """Worker: decode `paths` into rows start.. of the output file, mapping only those rows.
    Returns (images done, [(index, message)] of those that failed, their pixel counts)."""
    out = np.memmap(out_path, np.uint8, "r+", offset=start * 3 * side * side, shape=(len(paths), 3, side, side))
    bad, counts = [], np.zeros((3, 256), np.int64)
    for i, path in enumerate(paths):
        try:
            rgb = decode_image(path, side, decoding.resize, decoding.max_pixels)
        except BadImageError as error:
            bad.append((start + i, str(error)))
            continue
        out[i] = rgb.transpose(2, 0, 1)
        counts += pixel_counts(out[i])
    del out
    return len(paths), bad, counts


def _close_gaps(path, kept, row):
    """Move the decoded rows down over the rows of skipped files, in place, keeping their order."""
    out = np.memmap(path, np.uint8, "r+", shape=(os.path.getsize(path) // row, row))
    for new, old in enumerate(kept):
        if new != old:
            out[new] = out[old]
    out.flush()
    del out


def _usable_cpus():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
