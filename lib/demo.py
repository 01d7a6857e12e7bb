"""A small synthetic landmark dataset in the CSV layout, for the demo and the tests.

Each photo is a procedurally drawn building over a sky and a ground band. The 8 source
classes and the 2 target classes share parts (domes, columns, towers, rows of windows), so
features learnt on the source task help on the target task, as with the real landmarks.
Position, scale, colours, lighting, clouds and noise vary, so the task is learnable but not
trivial. Only numpy and pillow are used: generating it needs no torch.
"""
import csv
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from lib.files import cache_folder

# Bump when the drawings change, so cached copies are regenerated.
DEMO_VERSION = 1
SOURCE_CLASSES = ["arena", "twin_towers", "arch_bridge", "stepped_hall",
                  "spire", "domed_cathedral", "minarets", "wavy_facade"]
TARGET_CLASSES = ["portico_rotunda", "palace"]
CSV_NAME = "landmarks.csv"
CSV_COLUMNS = ["filename", "partition", "task", "semantic_label", "numeric_label"]


def _rect(yy, xx, x0, x1, y0, y1):
    return (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)


def _dome(yy, xx, cx, base, r):
    return ((xx - cx) ** 2 + (yy - base) ** 2 <= r * r) & (yy <= base)


def _triangle(yy, xx, cx, base, half, height):
    """An isosceles triangle pointing up, apex `height` above `base`."""
    rise = base - yy
    return (rise >= 0) & (rise <= height) & (np.abs(xx - cx) <= half * (1 - rise / height))


def _window_grid(yy, xx, period_x, period_y, size):
    return ((xx % period_x) < size) & ((yy % period_y) < size)


def _draw(name, yy, xx, cx, gy, s, rng):
    """Return (body, details) boolean masks of one building; details are darker openings."""
    w = s * rng.uniform(0.85, 1.15)
    empty = np.zeros_like(yy, dtype=bool)
    if name == "arena":
        body = _rect(yy, xx, cx - w, cx + w, gy - 0.9 * s, gy)
        body &= ((xx - cx) / w) ** 2 + ((yy - gy) / (0.9 * s)) ** 2 <= 1.3
        return body, body & _window_grid(yy, xx, 5, 6, 3) & (yy < gy - 2)
    if name == "twin_towers":
        gap = 0.35 * w
        body = empty.copy()
        for x in (cx - gap, cx + gap):
            body |= _rect(yy, xx, x - 0.18 * w, x + 0.18 * w, gy - 1.6 * s, gy)
            body |= _triangle(yy, xx, x, gy - 1.6 * s, 0.12 * w, 0.35 * s)
        body |= _rect(yy, xx, cx - gap, cx + gap, gy - 0.95 * s, gy - 0.85 * s)
        return body, empty
    if name == "arch_bridge":
        deck = _rect(yy, xx, cx - 1.3 * w, cx + 1.3 * w, gy - 0.75 * s, gy)
        arch = ((xx - cx) ** 2 / (0.9 * w) ** 2 + (yy - gy) ** 2 / (0.55 * s) ** 2) <= 1
        roof = _triangle(yy, xx, cx, gy - 0.75 * s, 0.5 * w, 0.35 * s)
        return (deck & ~arch) | roof, empty
    if name == "stepped_hall":
        body = empty.copy()
        for k in range(3):
            body |= _rect(yy, xx, cx - w * (1 - 0.28 * k), cx + w * (1 - 0.28 * k),
                          gy - 0.4 * s * (k + 1), gy - 0.4 * s * k)
        return body, body & _window_grid(yy, xx, 7, 9, 2)
    if name == "spire":
        body = _rect(yy, xx, cx - 0.25 * w, cx + 0.25 * w, gy - 1.1 * s, gy)
        body |= _triangle(yy, xx, cx, gy - 1.1 * s, 0.25 * w, 0.8 * s)
        body |= _rect(yy, xx, cx - 0.8 * w, cx + 0.8 * w, gy - 0.5 * s, gy)
        return body, empty
    if name == "domed_cathedral":
        body = _rect(yy, xx, cx - w, cx + w, gy - 0.6 * s, gy)
        body |= _dome(yy, xx, cx, gy - 0.6 * s, 0.55 * w)
        for x in (cx - 0.85 * w, cx + 0.85 * w):
            body |= _rect(yy, xx, x - 0.12 * w, x + 0.12 * w, gy - 1.0 * s, gy)
            body |= _dome(yy, xx, x, gy - 1.0 * s, 0.12 * w)
        return body, empty
    if name == "minarets":
        body = _rect(yy, xx, cx - 0.7 * w, cx + 0.7 * w, gy - 0.45 * s, gy)
        body |= _dome(yy, xx, cx, gy - 0.45 * s, 0.55 * w)
        for x in (cx - 1.1 * w, cx + 1.1 * w):
            body |= _rect(yy, xx, x - 0.05 * w - 0.6, x + 0.05 * w + 0.6, gy - 1.3 * s, gy)
            body |= _triangle(yy, xx, x, gy - 1.3 * s, 0.1 * w + 1, 0.25 * s)
        return body, empty
    if name == "wavy_facade":
        top = gy - 1.1 * s + 0.12 * s * np.sin((xx - cx) / (0.18 * w + 1))
        body = _rect(yy, xx, cx - 0.6 * w, cx + 0.6 * w, -1e9, gy) & (yy >= top)
        return body, body & (((xx - cx) % 6 - 3) ** 2 + (yy % 7 - 3) ** 2 <= 2)
    if name == "portico_rotunda":
        body = _dome(yy, xx, cx, gy - 0.55 * s, 0.6 * w)
        body |= _rect(yy, xx, cx - 0.9 * w, cx + 0.9 * w, gy - 0.55 * s, gy)
        body |= _triangle(yy, xx, cx, gy - 0.55 * s, 0.95 * w, 0.3 * s)
        columns = _rect(yy, xx, cx - 0.8 * w, cx + 0.8 * w, gy - 0.5 * s, gy - 1) & ((xx % 4) < 2)
        return body, columns
    if name == "palace":
        body = _rect(yy, xx, cx - 1.5 * w, cx + 1.5 * w, gy - 0.6 * s, gy)
        body |= _dome(yy, xx, cx, gy - 0.6 * s, 0.3 * w)
        body |= _rect(yy, xx, cx - 0.3 * w, cx + 0.3 * w, gy - 0.8 * s, gy - 0.6 * s)
        return body, body & _window_grid(yy, xx, 4, 5, 2) & (yy > gy - 0.55 * s)
    raise ValueError(f"unknown demo class {name!r}")


def render_image(name, rng, size=64):
    """Draw one photo of class `name` as a (size, size, 3) uint8 array."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    sky_top = rng.choice([[70, 120, 200], [150, 170, 190], [230, 150, 90], [110, 150, 210]])
    sky_top = np.asarray(sky_top, np.float32) + rng.normal(0, 15, 3)
    sky_bottom = sky_top + rng.uniform(20, 60)
    t = (yy / size)[..., None]
    img = sky_top * (1 - t) + sky_bottom * t
    for _ in range(rng.integers(0, 3)):
        cloud = ((xx - rng.uniform(0, size)) / rng.uniform(4, 10)) ** 2 + \
                ((yy - rng.uniform(0, size / 3)) / rng.uniform(2, 4)) ** 2 <= 1
        img[cloud] = img[cloud] * 0.4 + 150
    gy = rng.uniform(0.7, 0.9) * size
    ground = np.asarray(rng.choice([[90, 110, 70], [120, 120, 115], [70, 90, 120]]), np.float32)
    img[yy >= gy] = ground + rng.normal(0, 12, 3)
    s = rng.uniform(0.28, 0.42) * size
    cx = rng.uniform(0.35, 0.65) * size
    body, details = _draw(name, yy, xx, cx, gy, s, rng)
    colour = rng.uniform(110, 230) * np.asarray([1.0, rng.uniform(0.8, 1.0), rng.uniform(0.6, 1.0)])
    # Light from one side, so the model cannot rely on a flat colour.
    shade = 1 + rng.uniform(-0.25, 0.25) * (xx - cx) / size
    img[body] = (colour * shade[..., None])[body]
    img[details] = img[details] * rng.uniform(0.35, 0.6)
    img = img * rng.uniform(0.7, 1.2) + rng.normal(0, rng.uniform(4, 14), img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def generate_demo(root, seed=0, per_class=None, size=64):
    """Write the demo dataset (CSV layout) to `root` and return its path.

    per_class maps (task, partition) to images per class; the challenge partition is unlabelled.
    """
    per_class = per_class or {("source", "train"): 60, ("source", "val"): 20, ("source", "test"): 20,
                              ("target", "train"): 40, ("target", "val"): 30, ("target", "test"): 30,
                              ("target", "challenge"): 10}
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for (task, partition), count in per_class.items():
        classes = SOURCE_CLASSES if task == "source" else TARGET_CLASSES
        for label, name in enumerate(classes):
            for _ in range(count):
                filename = f"{len(rows):05d}.png"
                Image.fromarray(render_image(name, rng, size)).save(root / "images" / filename)
                labelled = partition != "challenge"
                rows.append([filename, partition, task, name if labelled else "", label if labelled else ""])
    tmp = root / (CSV_NAME + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(rows)
    os.replace(tmp, root / CSV_NAME)
    return root


def demo_root(seed=0):
    """Where the demo dataset is cached: outside the repository, in the user's cache folder."""
    return cache_folder() / f"demo-v{DEMO_VERSION}-seed{seed}"


def ensure_demo(seed=0):
    """Return the cached demo dataset's path, generating it on first use."""
    root = demo_root(seed)
    if not (root / CSV_NAME).exists():
        # Build beside the cache and rename, so concurrent processes never read a half-written set.
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=root.name + "."))
        generate_demo(tmp, seed)
        try:
            os.rename(tmp, root)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return root
