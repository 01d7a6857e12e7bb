"""The images the steps after training work on, chosen beside the data they come from: an
export's verification and calibration images (export.py), the images explain.py explains.

Images are a Split's: uint8 (N, 3, H, W) tensors at the checkpoint's image size and resize
policy, decoded by lib.data.load_split as training decoded them. Generated drawings
(lib.demo) stand in only when asked for (--synthetic-verify), never when real data is missing.
"""
import sys
from pathlib import Path

import numpy as np
import torch

from lib.checkpoint import read_preprocessing
from lib.data import Split, load_split, match_classes
from lib.demo import SOURCE_CLASSES, TARGET_CLASSES, render_image
from lib.errors import UserError
from lib.images import DEFAULT_MAX_PIXELS, BadImageError, decode_image
from lib.pixel_cache import DEFAULT


def loading_options(checkpoint, options):
    """load_split's keyword arguments for export.py (lib.cli.load_options of add_loading_args(...,
    from_checkpoint=True)), completed from the run that trained the checkpoint: its images are read
    as that run read them (--skip-bad-images, --max-image-pixels), so what it trained on exports."""
    run = checkpoint.get("args") or {}
    max_pixels = options["max_pixels"]
    return {**options, "skip_bad_images": options["skip_bad_images"] or bool(run.get("skip_bad_images")),
            "max_pixels": run.get("max_image_pixels", DEFAULT_MAX_PIXELS) if max_pixels is None else max_pixels}


def reference_images(checkpoint, data, split, synthetic=False, count=64, seed=0, loading=None):
    """(uint8 (N, 3, H, W) images, labels or None, where they came from) to verify or calibrate on.

    Real images: `data`, or when None the checkpoint's own --data/--task; a folder that is not
    there is an error, never a silent switch to made-up images. synthetic=True: `count`
    generated drawings instead. Where they came from is a dict (data, split, count) for the metadata.
    loading: load_split's keyword arguments (loading_options), None for its defaults.
    """
    if synthetic:
        # Calibration ("train") and verification draw different images.
        images, labels = generated_images(count, checkpoint["image_size"], seed + (split == "train"))
        return images, labels, {"data": "generated drawings (--synthetic-verify)", "split": None, "count": count}
    args = checkpoint.get("args") or {}
    task = checkpoint.get("task") or args.get("task")
    if data is not None and data != "demo" and not Path(data).is_dir():
        raise UserError(f"--verify-data {data}: no such folder")
    flag = "--verify-data" if data is not None else "the checkpoint's --data"
    if data is None:
        data = args.get("data")
        if isinstance(data, list):  # trained on several datasets: the first one names the classes in order
            data = data[0]
        if data is None or (data != "demo" and not Path(data).is_dir()):
            where = f"its data folder {data} is not here" if data else "it names no data folder"
            raise UserError(f"nothing to verify the export on: {where}; give --verify-data DIR, "
                            f"or --synthetic-verify for generated images")
    facts = read_preprocessing(checkpoint)
    try:
        part = load_split(data, split, task, facts.image_size, resize=facts.resize, **(loading or {}))
    except UserError as error:  # load_split names the --data of the scripts that train
        if not str(error).startswith("--data "):
            raise
        raise UserError(flag + str(error)[len("--data"):]) from None
    if part.labels is not None:
        part = match_classes(part, checkpoint["classes"], f"--verify-data {data}")
    folder = data if data == "demo" else str(Path(data).resolve())
    return part.images, part.labels, {"data": folder, "split": split, "count": len(part)}


def generated_images(count, image_size, seed):
    """Demo-style drawings, only when asked for (--synthetic-verify); unlabelled for this model."""
    rng = np.random.default_rng(seed)
    names = SOURCE_CLASSES + TARGET_CLASSES
    pixels = np.stack([render_image(names[i % len(names)], rng, image_size) for i in range(count)])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), None


def describe_images(source):
    if source["split"] is None:
        return f"{source['count']} {source['data']}"
    return f"{source['count']} images of {source['data']} ({source['split']})"


def calibration_images(checkpoint, data, synthetic, count, seed, loading=None):
    """(uint8 (count, 3, H, W) images, where they came from) to calibrate int8 on: a seeded sample of
    the training split of `data` (None: the checkpoint's own), or generated drawings when
    `synthetic`; loading: load_split's keyword arguments (loading_options). Prints the class balance."""
    images, labels, source = reference_images(checkpoint, data, "train", synthetic, count=count, seed=seed,
                                              loading=loading)
    chosen = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:count]
    counts = class_counts(None if labels is None else labels[chosen], checkpoint["classes"])
    balance = ", ".join(f"{name} {n}" for name, n in counts.items()) if counts else "unlabelled"
    print(f"int8 calibration images: {len(chosen)} of {describe_images(source)}: {balance}")
    return images[chosen], {**source, "count": len(chosen), "class_counts": counts}


def class_counts(labels, classes):
    """{class name: images} of a labelled set, None for an unlabelled one."""
    if labels is None:
        return None
    counts = np.bincount(np.asarray(labels), minlength=len(classes))
    return {name: int(count) for name, count in zip(classes, counts)}


def load_images(files, data, task, split, num_images, seed, image_size, classes, resize, *,
                skip_bad_images=False, max_pixels=DEFAULT_MAX_PIXELS, cache_dir=DEFAULT):
    """The images to explain: the given files (unlabelled), or a seeded sample of a split (0 = all).
    resize and the keyword arguments: as lib.data.load_split's."""
    if files:
        if data is not None:
            raise UserError("--images and --data: give one or the other")
        return _image_files(files, image_size, resize, skip_bad_images, max_pixels, classes)
    if data is None:
        raise UserError("--data: required unless --images is given")
    full = load_split(data, split, task, image_size, skip_bad_images, resize=resize, max_pixels=max_pixels,
                      cache_dir=cache_dir)
    if num_images and num_images < len(full):
        chosen = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed))[:num_images].sort().values
        full = full.rows(chosen)
    return full


def _image_files(files, image_size, resize, skip_bad_images, max_pixels, classes):
    """--images as an unlabelled Split; an unreadable file is an error, or skipped with a warning."""
    decoded, kept = [], []
    for path in files:
        try:
            decoded.append(decode_image(path, image_size, resize, max_pixels))
            kept.append(str(path))
        except BadImageError as error:
            if not skip_bad_images:
                raise BadImageError(f"{error}; --skip-bad-images leaves unreadable images out") from None
            print(f"warning: skipped {error}", file=sys.stderr)
    if not decoded:
        raise UserError(f"--images: no readable images among {len(files)} file(s)")
    return Split(torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).contiguous(), None, list(classes), kept)
