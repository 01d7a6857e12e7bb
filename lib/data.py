"""Loading a split of a dataset, decoded once, as uint8 tensors (memory-mapped from the pixel cache).

Two layouts are recognised from the folder given with --data:
- CSV layout: DIR/landmarks.csv (filename, partition, task, semantic_label, numeric_label) and
  DIR/images/. --task selects rows; class names come from semantic_label ordered by numeric_label.
  The file is read as UTF-8 (a byte-order mark, as spreadsheets write "CSV UTF-8", is skipped;
  CRLF line ends are fine). A filename must stay inside images/ as written (no absolute path, no
  '..'); an entry of images/ that is a symbolic link is followed wherever it points.
- ImageFolder layout (torchvision's): DIR/<split>/<class>/<image>. Class names are the sorted
  folder names of DIR/train (or of the split itself when there is no train folder). A split
  folder holding images directly, without class folders, is unlabelled; image files lying
  beside class folders belong to no class and are left out, with a warning. Files whose
  extension Pillow cannot read (and hidden files) are left out and counted. --task is not used.
The name "demo" stands for the built-in synthetic dataset (lib.demo).

load_split is the only door: the pixels come from lib.pixel_cache (decoded on first use, then
memory-mapped), so Split.images is a tensor over a file's pages, read as batches index it.
"""
import csv
import io
import math
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from lib.demo import CSV_COLUMNS, CSV_NAME, ensure_demo
from lib.errors import UserError
from lib.images import DEFAULT_MAX_PIXELS, BadImageError, is_image_name, median_short_side
from lib.pixel_cache import DEFAULT, Decoding, load_pixels, pixel_counts, stats_from_counts
from lib.preprocessing import DEFAULT_IMAGE_SIZE, DEFAULT_RESIZE, check_resize

SPLITS = ("train", "val", "test", "challenge")
TASKS = ("source", "target")


@dataclass
class Split:
    images: torch.Tensor          # (N, 3, H, W) uint8 (or ImageRows: chosen rows of such tensors)
    labels: torch.Tensor | None   # (N,) int64, or None for an unlabelled split
    classes: list                 # class names, index = label
    filenames: list               # one per image: the CSV's filename, or the path under DIR
    mean: list | None = None      # per-channel mean of `images` on the 0..1 scale (load_split sets it)
    std: list | None = None       # per-channel standard deviation, likewise

    def __len__(self):
        return len(self.filenames)

    def rows(self, index):
        """The rows `index` (ints or an index tensor) as a Split: a view of memory-mapped or pooled
        images (ImageRows), a copy of a tensor's. mean/std are not carried: they describe other rows."""
        index = torch.as_tensor(index, dtype=torch.int64)
        images = self.images.subset(index) if isinstance(self.images, ImageRows) else self.images[index]
        return Split(images, None if self.labels is None else self.labels[index], self.classes,
                     [self.filenames[i] for i in index.tolist()])


class ImageRows:
    """Chosen rows of one or more uint8 (N, 3, H, W) tensors, seen as one, without copying them:
    a pooled or k-fold split over memory-mapped pixels. Indexing (an int, a slice or an index
    tensor) gathers just those rows into a new tensor, as indexing a tensor would."""

    def __init__(self, parts, index=None):
        self.parts = list(parts)
        sizes = torch.tensor([len(part) for part in self.parts])
        self.ends = sizes.cumsum(0)
        self.index = torch.arange(int(sizes.sum())) if index is None else torch.as_tensor(index, dtype=torch.int64)
        self.shape = (len(self.index), *self.parts[0].shape[1:])
        self.dtype = self.parts[0].dtype

    def __len__(self):
        return len(self.index)

    def subset(self, index):
        return ImageRows(self.parts, self.index[torch.as_tensor(index, dtype=torch.int64)])

    def __getitem__(self, key):
        rows = self.index[key].contiguous()
        if rows.dim() == 0:
            return self._gather(rows.view(1))[0]
        return self._gather(rows)

    def _gather(self, rows):
        out = torch.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        part_of = torch.bucketize(rows, self.ends, right=True)
        for number, part in enumerate(self.parts):
            mine = part_of == number
            if mine.any():
                start = int(self.ends[number]) - len(part)
                out[mine] = part[rows[mine] - start]
        return out


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


def load_split(data, split, task=None, image_size=DEFAULT_IMAGE_SIZE, skip_bad_images=False, *, resize=DEFAULT_RESIZE,
               max_pixels=DEFAULT_MAX_PIXELS, cache_dir=DEFAULT):
    """One split of the dataset at `data` as a Split of uint8 (N, 3, image_size, image_size) images.

    resize: lib.images' policy (squash, crop, pad); max_pixels: the largest image accepted (0: any).
    cache_dir: the pixel cache folder, DEFAULT ($XDG_CACHE_HOME/landmark-classification/pixels),
    or None to decode without keeping the pixels (lib.pixel_cache). Unreadable images are an
    error naming the first, or with skip_bad_images left out with a warning.
    """
    if split not in SPLITS:
        raise UserError(f"--split {split}: must be one of {', '.join(SPLITS)}")
    check_resize(resize)
    root = resolve_data_dir(data).resolve()
    paths, labels, classes, names, task = _list_split(root, split, task)
    pixels = load_pixels(paths, Decoding(image_size, resize, max_pixels), cache_dir,
                         identity=f"{root}|{split}|{task}", label=f"{root.name} {split}{' ' + task if task else ''}")
    if pixels.skipped and not skip_bad_images:
        more = f" (and {len(pixels.skipped) - 1} more)" if len(pixels.skipped) > 1 else ""
        raise BadImageError(f"{pixels.skipped[0]}{more}; --skip-bad-images leaves unreadable images out")
    if not pixels.kept:
        raise UserError(f"no readable images among {len(paths)} file(s)")
    if pixels.skipped:
        print(f"warning: skipped {len(pixels.skipped)} unreadable image(s), first: {pixels.skipped[0]}",
              file=sys.stderr)
    filenames = [names[i] for i in pixels.kept]
    if labels is not None:
        labels = torch.tensor([labels[i] for i in pixels.kept], dtype=torch.int64)
    return Split(torch.from_numpy(pixels.images), labels, classes, filenames, pixels.mean, pixels.std)


PHOTO_SIDE_SAMPLE = 200  # header reads: a few ms, however large the dataset


def _list_split(root, split, task):
    """(paths, labels or None, classes, names, task) of one split of the dataset at folder `root`;
    task is None for the ImageFolder layout, which has no tasks. Raises UserError when the split
    has no images."""
    if detect_layout(root) == "csv":
        paths, labels, classes, names = _read_csv(root, split, task)
    else:
        paths, labels, classes = _read_imagefolder(root, split)
        names = [str(p.relative_to(root)) for p in paths]
        task = None
    if not paths:
        where = f"task {task!r}, partition {split!r}" if task else f"split {split!r}"
        raise UserError(f"--data {root}: no images for {where}")
    return paths, labels, classes, names, task


def photo_side(datasets, task=None):
    """The short side (px) of the training photos, for choosing an image size: the median of
    min(width, height) over up to PHOTO_SIDE_SAMPLE evenly spaced train files of each dataset,
    read from their headers (nothing is decoded), and over several datasets the smallest of those
    medians, so none is upsampled. None when no header can be read. Raises UserError as
    load_split does."""
    medians = []
    for data in datasets if isinstance(datasets, (list, tuple)) else [datasets]:
        paths = _list_split(resolve_data_dir(data).resolve(), "train", task)[0]
        side = median_short_side(paths[::math.ceil(len(paths) / PHOTO_SIDE_SAMPLE)])
        if side is not None:
            medians.append(side)
    return min(medians, default=None)


def _read_csv(root, split, task):
    """(paths, labels or None, classes, filenames as written) of the rows of `task` and `split`."""
    if task not in TASKS:
        raise UserError(f"--task {task}: the CSV layout needs --task, one of {', '.join(TASKS)}")
    csv_path = root / CSV_NAME
    reader = csv.DictReader(io.StringIO(_read_text(csv_path), newline=""))
    missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise UserError(f"{csv_path}: missing column(s) {', '.join(missing)}")
    rows = [r for r in reader if r["task"] == task]
    names = {}
    for r in rows:
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
    filenames = [r["filename"] for r in rows]
    paths = [_inside(root / "images", name, csv_path) for name in filenames]
    if split == "challenge" or not rows:
        return paths, None, classes, filenames
    unlabelled = [r["filename"] for r in rows if not r["numeric_label"]]
    if unlabelled:
        raise UserError(f"{csv_path}: {len(unlabelled)} image(s) of partition {split!r} have no "
                        f"label, e.g. {unlabelled[0]}")
    return paths, [int(r["numeric_label"]) for r in rows], classes, filenames


def _read_text(csv_path):
    """The CSV file as text: UTF-8, with or without a byte-order mark; anything else is refused
    (a legacy code page cannot be told apart from UTF-8 reliably, and a guess would misname files)."""
    data = csv_path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise UserError(f"{csv_path}: not UTF-8 (byte 0x{data[error.start]:02x} on line {line}); save it "
                        "as UTF-8 (a spreadsheet's \"CSV UTF-8\"), e.g. iconv -f cp1252 -t utf-8") from None


def _inside(folder, filename, csv_path):
    """folder/filename, refusing names that escape it as written: absolute paths and '..' parts.
    A symbolic link inside the folder is the user's to place, and is followed wherever it points."""
    if not filename or os.path.isabs(filename) or ".." in PurePosixPath(filename).parts:
        raise UserError(f"{csv_path}: filename {filename!r} points outside {folder} "
                        "(absolute paths and '..' are refused; a symbolic link inside it may point anywhere)")
    return folder / filename


def _image_files(folder):
    """(image files, how many other visible files) in `folder`, sorted; hidden files are ignored."""
    files = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file())
    images = [p for p in files if is_image_name(p)]
    return images, len(files) - len(images)


def _class_folders(folder):
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_imagefolder(root, split):
    folder = root / split
    if not folder.is_dir():
        raise UserError(f"--data {root}: no {split}/ folder")
    own = _class_folders(folder)
    train_classes = _class_folders(root / "train") if (root / "train").is_dir() else None
    loose, unknown_extension = _image_files(folder)
    if not own:
        _warn_unknown_extensions(folder, unknown_extension)
        return loose, None, train_classes or []
    if loose:
        print(f"warning: {folder}: {len(loose)} image file(s) beside the class folders have no class "
              f"and are not used, e.g. {loose[0].name}", file=sys.stderr)
    classes = train_classes or own
    unknown = [c for c in own if c not in classes]
    if unknown:
        raise UserError(f"{folder}: class folder(s) {', '.join(unknown)} are not in train/ "
                        f"({', '.join(classes)})")
    paths, labels, unknown_extension = [], [], 0
    for label, name in enumerate(classes):
        if (folder / name).is_dir():
            files, others = _image_files(folder / name)
            paths += files
            labels += [label] * len(files)
            unknown_extension += others
    _warn_unknown_extensions(folder, unknown_extension)
    return paths, labels, classes


def _warn_unknown_extensions(folder, count):
    if count:
        print(f"warning: {folder}: skipped {count} file(s) whose extension Pillow does not read "
              "(lib.images.IMAGE_SUFFIXES lists those it does)", file=sys.stderr)


def channel_stats(images, chunk=256):
    """Per-channel mean and std (n - 1) of uint8 images (N, 3, H, W), on the 0..1 scale, as plain
    lists; in chunks, with exact integer sums (load_split's Split carries them already)."""
    counts = sum(pixel_counts(np.asarray(images[start:start + chunk])) for start in range(0, len(images), chunk))
    return stats_from_counts(counts)


def class_order(names, reference, where, sides=("the data", "the model")):
    """For each of `names`, its index in `reference`: the same class names in any order map onto
    each other. A different set of names (or a name repeated) is a UserError starting with
    `where` that names what is in one and not the other; sides: what `names` and `reference` are."""
    names, reference = list(names), list(reference)
    extra = [name for name in names if name not in reference]
    missing = [name for name in reference if name not in names]
    if extra or missing or len(set(names)) != len(names) or len(set(reference)) != len(reference):
        parts = ([f"in {sides[1]}, not in {sides[0]}: {', '.join(missing)}"] if missing else []) + \
                ([f"in {sides[0]}, not in {sides[1]}: {', '.join(extra)}"] if extra else [])
        raise UserError(f"{where}: the classes differ ({'; '.join(parts) or 'a class name repeats'})")
    return [reference.index(name) for name in names]


def match_classes(split, classes, where):
    """The split with its labels renumbered to `classes` (a model's class names, in its order),
    which become its classes: the same names in another order (an ImageFolder's sorted folders
    against a CSV's numeric_label order) give the same images the same names. A different set of
    names is class_order's UserError."""
    if list(split.classes) == list(classes):
        return split
    order = torch.tensor(class_order(split.classes, classes, where))
    return replace(split, labels=None if split.labels is None else order[split.labels], classes=list(classes))


def load_datasets(datasets, split, task=None, image_size=DEFAULT_IMAGE_SIZE, skip_bad_images=False, **options):
    """`split` of one dataset (a --data value) or of several (a list of them) as one Split.

    Each dataset is loaded by load_split (decoded and cached on its own, at image_size) and the
    Splits are joined by combine_splits. options: load_split's keyword arguments. Raises
    UserError for a dataset given twice, or classes that do not match by name."""
    if not isinstance(datasets, (list, tuple)):
        return load_split(datasets, split, task, image_size, skip_bad_images, **options)
    check_distinct(datasets)
    parts = [load_split(data, split, task, image_size, skip_bad_images, **options) for data in datasets]
    return combine_splits(parts, [str(data) for data in datasets])


def check_distinct(datasets):
    """Refuse a dataset given twice (its images would count double)."""
    seen = {}
    for data in datasets:
        where = data if str(data) == "demo" else resolve_data_dir(data).resolve()
        if where in seen:
            raise UserError(f"--data {data}: the same dataset as {seen[where]}; give each dataset once")
        seen[where] = data


def combine_splits(parts, names):
    """One Split of several (the same split of several datasets), rows in the order given.

    Classes are matched by name and take the first Split's order (a CSV orders them by
    numeric_label, an ImageFolder alphabetically), so the others' labels are remapped. The images
    are not copied: an ImageRows over each Split's memory-mapped tensor. Filenames get their
    dataset's folder name in front (NAME/filename), mean and std are computed over all rows.
    Unlabelled Splits (labels None) combine without a class check. names: each part's --data,
    for errors. Raises UserError for a class in one dataset only, or a dataset sharing no class
    (another task's), or labelled and unlabelled Splits mixed."""
    labelled = [part.labels is not None for part in parts]
    if any(labelled) and not all(labelled):
        raise UserError(f"--data {names[labelled.index(False)]}: unlabelled, while "
                        f"{names[labelled.index(True)]} is labelled; combine datasets of one kind")
    classes = list(parts[0].classes)
    labels = None
    if all(labelled):
        for part, name in zip(parts[1:], names[1:]):
            check_class_names(classes, names[0], part.classes, name)
        labels = torch.cat([remap_labels(part.labels, part.classes, classes) for part in parts])
    filenames = [f"{Path(name).name}/{filename}" for part, name in zip(parts, names) for filename in part.filenames]
    images = ImageRows([part.images for part in parts])
    mean, std = channel_stats(images)
    return Split(images, labels, classes, filenames, mean, std)


def check_class_names(classes, name, other_classes, other_name):
    """The two datasets must name the same classes (in any order); the error names the odd one out."""
    if set(classes) == set(other_classes):
        return
    if not set(classes) & set(other_classes):
        raise UserError(f"--data {other_name}: none of its classes ({', '.join(other_classes)}) is one of "
                        f"{name}'s ({', '.join(classes)}): a dataset of another task")
    only_here = [c for c in classes if c not in other_classes]
    odd, where = (only_here[0], name) if only_here else \
        (next(c for c in other_classes if c not in classes), other_name)
    raise UserError(f"--data: class {odd!r} is in {where} only; combined datasets must name the same classes")


def remap_labels(labels, from_classes, to_classes):
    """labels (N,) int64 indexing from_classes, as indices into to_classes (the same names)."""
    mapping = torch.tensor([to_classes.index(name) for name in from_classes], dtype=torch.int64)
    return mapping[labels]


def load_photo_folder(folder, image_size=DEFAULT_IMAGE_SIZE, skip_bad_images=False, *, resize=DEFAULT_RESIZE,
                      max_pixels=DEFAULT_MAX_PIXELS, cache_dir=DEFAULT):
    """Every image in `folder` and its subfolders (sorted; hidden files and folders left out), as an
    unlabelled Split of uint8 (N, 3, image_size, image_size) images; decoded and cached as load_split
    does (same keyword arguments). Raises UserError for a missing folder or one without images."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"--unlabelled {folder}: no such folder (give a folder of photos, or 'challenge')")
    root = root.resolve()
    files = sorted(p for p in root.rglob("*") if p.is_file() and is_image_name(p)
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise UserError(f"--unlabelled {folder}: no images in it or its subfolders "
                        "(lib.images.IMAGE_SUFFIXES lists the extensions read)")
    check_resize(resize)
    pixels = load_pixels(files, Decoding(image_size, resize, max_pixels), cache_dir,
                         identity=f"{root}|photos", label=f"{root.name} photos")
    if pixels.skipped and not skip_bad_images:
        raise BadImageError(f"{pixels.skipped[0]}; --skip-bad-images leaves unreadable images out")
    if not pixels.kept:
        raise UserError(f"--unlabelled {folder}: no readable images among {len(files)} file(s)")
    names = [str(files[i].relative_to(root)) for i in pixels.kept]
    return Split(torch.from_numpy(pixels.images), None, [], names, pixels.mean, pixels.std)
