"""The data path at scale: decoding, cached loading, memory and one epoch, on generated photo sets.

Example: python bench/bench_data.py --images 2000 --sizes 64 128
         python bench/bench_data.py --images 10000 50000 200000 --sizes 64 128 --json data.json
For each --images N, writes N generated photos (--photo-size px JPEGs, ImageFolder layout, 8
classes, 80% train / 20% val) into --workdir once (reused by later runs), then for each --sizes S,
each step in its own process, with a fresh pixel cache:
  cold    load_split of train and val with an empty cache: decoding (images/s);
  cached  the same again: reading the cache (images/s);
  epoch   train.py --model cnn3 --epochs 1 --amp off on the cached data: the epoch's seconds
          (metrics.csv) and the process's wall time.
Memory is sampled from /proc/PID/status every 10 ms: peak RssAnon (private memory: the Python
heap, torch, batches) and peak RssFile (file pages mapped, here the cached pixels the process
touched; the kernel can drop them under pressure), as pages read through a memory map count in
RSS. Decoding worker processes are not included (each holds one image at a time). "Cold" means
not yet decoded; the JPEG files may still be in the page cache from generation.
"""
import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lib.demo import SOURCE_CLASSES, render_image  # noqa: E402

LOAD = """
import json, sys, time
sys.path.insert(0, {repo!r})
from lib.data import load_split
seconds = {{}}
for split in ("train", "val"):
    started = time.perf_counter()
    load_split({data!r}, split, image_size={size}, cache_dir={cache!r})
    seconds[split] = time.perf_counter() - started
print(json.dumps(seconds))
"""


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[2000], help="photo counts to measure")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="--image-size values")
    parser.add_argument("--photo-size", type=int, default=256, help="side of the generated JPEGs")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "landmark-bench-data",
                        help="where the photos, caches and runs go (photos are reused)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON to this file")
    return parser


# --- generated photos ----------------------------------------------------------------------------

def _write_photos(job):
    """Worker: demo drawings rendered at 64 px, enlarged and given sensor-like noise, as JPEGs."""
    folder, start, count, photo_size = job
    rng = np.random.default_rng(start)
    for i in range(start, start + count):
        name = SOURCE_CLASSES[i % len(SOURCE_CLASSES)]
        split = "val" if i % 5 == 4 else "train"
        small = Image.fromarray(render_image(name, rng, 64))
        big = np.asarray(small.resize((photo_size, photo_size), Image.Resampling.BICUBIC), dtype=np.int16)
        noisy = np.clip(big + rng.integers(-6, 7, big.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / split / name / f"{i:07d}.jpg", quality=90)


def generate(folder, count, photo_size):
    """The photo set for `count` images, generated once (a marker file says it is complete)."""
    done = folder / "COMPLETE"
    if done.exists() and done.read_text() == f"{count} {photo_size}":
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    for split in ("train", "val"):
        for name in SOURCE_CLASSES:
            (folder / split / name).mkdir(parents=True)
    started = time.perf_counter()
    jobs = [(folder, start, min(500, count - start), photo_size) for start in range(0, count, 500)]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_write_photos, jobs))
    done.write_text(f"{count} {photo_size}")
    print(f"generated {count} photos in {folder} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return folder


# --- measuring a process -------------------------------------------------------------------------

def _memory(pid):
    """RssAnon, RssFile and RssShmem of a process, in bytes (None once it has gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) * 1024 for key in ("RssAnon", "RssFile", "RssShmem") if key in fields}


def run_measured(command):
    """Run `command`; returns (stdout, wall seconds, peak RssAnon, peak RssFile, peak of their sum)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = {"anon": 0, "file": 0, "total": 0}

    def sample():
        while process.poll() is None:
            now = _memory(process.pid)
            if now:
                peaks["anon"] = max(peaks["anon"], now["RssAnon"])
                peaks["file"] = max(peaks["file"], now["RssFile"])
                peaks["total"] = max(peaks["total"], sum(now.values()))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = process.communicate()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, command))} exited {process.returncode}:\n{err}")
    return out, time.perf_counter() - started, peaks


def measure(data, count, size, workdir):
    cache = workdir / f"cache-{count}-{size}"
    shutil.rmtree(cache, ignore_errors=True)
    load = [sys.executable, "-c", LOAD.format(repo=str(REPO), data=str(data), size=size, cache=str(cache))]
    cold, _, cold_peaks = run_measured(load)
    warm, _, warm_peaks = run_measured(load)
    run = workdir / f"run-{count}-{size}"
    _, wall, train_peaks = run_measured([sys.executable, "train.py", "--data", str(data), "--model", "cnn3",
                                         "--image-size", str(size), "--epochs", "1", "--amp", "off",
                                         "--pixel-cache", str(cache), "--out", str(run), "--overwrite"])
    with open(run / "metrics.csv") as f:
        epoch = float(next(csv.DictReader(f))["seconds"])
    decode_s, load_s = sum(json.loads(cold).values()), sum(json.loads(warm).values())
    return {"images": count, "image_size": size, "pixels_gb": count * 3 * size * size / 1e9,
            "decode_images_per_s": count / decode_s, "decode_s": decode_s,
            "cached_images_per_s": count / load_s, "cached_s": load_s,
            "decode_peak_anon_gb": cold_peaks["anon"] / 1e9, "cached_peak_anon_gb": warm_peaks["anon"] / 1e9,
            "train_peak_anon_gb": train_peaks["anon"] / 1e9, "train_peak_file_gb": train_peaks["file"] / 1e9,
            "train_peak_rss_gb": train_peaks["total"] / 1e9, "epoch_s": epoch, "train_wall_s": wall}


def format_table(rows):
    lines = ["| photos | px | pixels GB | decode img/s (cold) | cached load img/s | train.py peak RssAnon GB | "
             "peak RssFile GB | peak RSS GB | epoch s (cnn3) | train.py wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['images']} | {r['image_size']} | {r['pixels_gb']:.2f} | {r['decode_images_per_s']:.0f} | "
                     f"{r['cached_images_per_s']:.0f} | {r['train_peak_anon_gb']:.2f} | {r['train_peak_file_gb']:.2f} | "
                     f"{r['train_peak_rss_gb']:.2f} | {r['epoch_s']:.1f} | {r['train_wall_s']:.1f} |")
    return "\n".join(lines)


def main(args):
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start", file=sys.stderr)
    rows = []
    for count in args.images:
        data = generate(args.workdir / f"photos-{count}-{args.photo_size}", count, args.photo_size)
        for size in args.sizes:
            rows.append(measure(data, count, size, args.workdir))
            print(format_table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end", file=sys.stderr)
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
