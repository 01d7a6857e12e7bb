"""Loading a split of a dataset into memory, once, as uint8 tensors.

Two layouts are recognised from the folder given with --data:
- CSV layout: DIR/landmarks.csv (filename, partition, task, semantic_label, numeric_label) and
  DIR/images/. --task selects rows; class names come from semantic_label ordered by numeric_label.
- ImageFolder layout (torchvision's): DIR/<split>/<class>/<image>. Class names are the sorted
  folder names of DIR/train (or of the split itself when there is no train folder). A split
  folder holding images directly, without class folders, is unlabelled; image files lying
  beside class folders belong to no class and are left out, with a warning. --task is not used.
The name "demo" stands for the built-in synthetic dataset (lib.demo).
"""
import csv
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lib.demo import CSV_COLUMNS, CSV_NAME, ensure_demo
from lib.errors import UserError
from lib.images import IMAGE_SUFFIXES, BadImageError, decode_image

SPLITS = ("train", "val", "test", "challenge")
TASKS = ("source", "target")


@dataclass
class Split:
    images: torch.Tensor          # (N, 3, H, W) uint8
    labels: torch.Tensor | None   # (N,) int64, or None for an unlabelled split
    classes: list                 # class names, index = label
    filenames: list               # one per image: the CSV's filename, or the path under DIR

    def __len__(self):
        return len(self.filenames)


def resolve_data_dir(data):
    """Turn the --data value into a folder, generating the demo dataset for "demo"."""
    if str(data) == "demo":
        return ensure_demo()
    path = Path(data)
    if not path.exists():
        raise UserError(f"--data {data}: no such folder")
    if not path.is_dir():
        raise UserError(f"--data {data}: not a folder")
    return path


def detect_layout(root):
    if (root / CSV_NAME).is_file():
        return "csv"
    if any((root / split).is_dir() for split in SPLITS):
        return "imagefolder"
    raise UserError(f"--data {root}: neither layout: expected {CSV_NAME} or train/ val/ test/ folders")


def load_split(data, split, task=None, image_size=64, skip_bad_images=False):
    """Decode one split of the dataset at `data` into a Split."""
    if split not in SPLITS:
        raise UserError(f"--split {split}: must be one of {', '.join(SPLITS)}")
    root = resolve_data_dir(data).resolve()
    if detect_layout(root) == "csv":
        paths, labels, classes = _read_csv(root, split, task)
        names_from = (root / "images").resolve()
    else:
        paths, labels, classes = _read_imagefolder(root, split)
        names_from = root
    if not paths:
        where = f"task {task!r}, partition {split!r}" if task else f"split {split!r}"
        raise UserError(f"--data {root}: no images for {where}")
    images, keep = _decode_all(paths, image_size, skip_bad_images)
    filenames = [str(p.relative_to(names_from)) for p, k in zip(paths, keep) if k]
    if labels is not None:
        labels = torch.tensor([l for l, k in zip(labels, keep) if k], dtype=torch.int64)
    return Split(images, labels, classes, filenames)


def _read_csv(root, split, task):
    if task not in TASKS:
        raise UserError(f"--task {task}: the CSV layout needs --task, one of {', '.join(TASKS)}")
    csv_path = root / CSV_NAME
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{csv_path}: missing column(s) {', '.join(missing)}")
        rows = [r for r in reader if r["task"] == task]
    names = {}
    for line, r in enumerate(rows, start=2):
        if r["semantic_label"]:
            try:
                number = int(r["numeric_label"])
            except ValueError:
                raise UserError(f"{csv_path}: numeric_label {r['numeric_label']!r} of "
                                f"{r['filename']} is not an integer") from None
            if names.setdefault(number, r["semantic_label"]) != r["semantic_label"]:
                raise UserError(f"{csv_path}: numeric_label {number} names both "
                                f"{names[number]!r} and {r['semantic_label']!r}")
    if sorted(names) != list(range(len(names))):
        raise UserError(f"{csv_path}: numeric_label of task {task!r} must be 0..K-1, found {sorted(names)}")
    classes = [names[i] for i in range(len(names))]
    rows = [r for r in rows if r["partition"] == split]
    images_dir = (root / "images").resolve()
    paths = [_inside(images_dir, r["filename"], csv_path) for r in rows]
    if split == "challenge" or not rows:
        return paths, None, classes
    unlabelled = [r["filename"] for r in rows if not r["numeric_label"]]
    if unlabelled:
        raise UserError(f"{csv_path}: {len(unlabelled)} image(s) of partition {split!r} have no "
                        f"label, e.g. {unlabelled[0]}")
    return paths, [int(r["numeric_label"]) for r in rows], classes


def _inside(folder, filename, csv_path):
    """Refuse file names that escape the images folder (../, absolute paths, links out)."""
    path = (folder / filename).resolve()
    if not filename or os.path.isabs(filename) or not path.is_relative_to(folder):
        raise UserError(f"{csv_path}: filename {filename!r} points outside {folder}")
    return path


def _image_files(folder):
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _class_folders(folder):
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_imagefolder(root, split):
    folder = root / split
    if not folder.is_dir():
        raise UserError(f"--data {root}: no {split}/ folder")
    own = _class_folders(folder)
    if not own:
        return _image_files(folder), None, _class_folders(root / "train") if (root / "train").is_dir() else []
    stray = _image_files(folder)
    if stray:
        print(f"warning: {folder}: {len(stray)} image file(s) beside the class folders have no class "
              f"and are not used, e.g. {stray[0].name}", file=sys.stderr)
    classes = _class_folders(root / "train") if (root / "train").is_dir() else own
    unknown = [c for c in own if c not in classes]
    if unknown:
        raise UserError(f"{folder}: class folder(s) {', '.join(unknown)} are not in train/ "
                        f"({', '.join(classes)})")
    paths, labels = [], []
    for label, name in enumerate(classes):
        if (folder / name).is_dir():
            files = _image_files(folder / name)
            paths += files
            labels += [label] * len(files)
    return paths, labels, classes


def _decode_all(paths, image_size, skip_bad_images):
    """Decode in a thread pool (pillow releases the GIL while decoding)."""
    def decode(path):
        try:
            return decode_image(path, image_size)
        except BadImageError as error:
            if not skip_bad_images:
                raise
            return error

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        decoded = list(pool.map(decode, paths))
    bad = [d for d in decoded if isinstance(d, BadImageError)]
    if bad:
        print(f"warning: skipped {len(bad)} unreadable image(s), first: {bad[0]}", file=sys.stderr)
    keep = [not isinstance(d, BadImageError) for d in decoded]
    good = [d for d in decoded if not isinstance(d, BadImageError)]
    if not good:
        raise UserError(f"no readable images among {len(paths)} file(s)")
    images = torch.from_numpy(np.stack(good)).permute(0, 3, 1, 2).contiguous()
    return images, keep


def channel_stats(images):
    """Per-channel mean and std of uint8 images, on the 0..1 scale, as plain lists."""
    x = images.to(torch.float64) / 255
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).tolist()


def check_labels_in_classes(split, classes, where):
    """The split's class list must be the checkpoint's: a mismatch would give wrong numbers."""
    if list(split.classes) != list(classes):
        raise UserError(f"{where}: the data's classes {split.classes} differ from the "
                        f"checkpoint's {list(classes)}")
