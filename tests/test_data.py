"""The data path: every kind of image file decodes to the right pixels or is refused in one line,
dataset files as real tools write them, the resize policy end to end (the pixel cache:
test_pixel_cache.py)."""
import csv
import json
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_main
from lib.checkpoint import load_checkpoint, save_checkpoint
from lib.data import load_split
from lib.demo import render_image
from lib.edge import read_metadata
from lib.errors import UserError
from lib.images import BadImageError, decode_image
from lib.onnx_export import stamp_metadata

# --- helpers ---------------------------------------------------------------------------------------


def photo(seed=0, size=64):
    """A demo drawing, as (size, size, 3) uint8: a picture with structure, not noise."""
    return render_image("palace", np.random.default_rng(seed), size)


def write_png16(path, samples):
    """A 16-bit PNG as libpng-based tools write it (Pillow cannot write 16-bit colour):
    samples (H, W) gray, (H, W, 2) gray+alpha, (H, W, 3) RGB or (H, W, 4) RGBA, uint16."""
    samples = np.asarray(samples, dtype=np.uint16)
    channels = 1 if samples.ndim == 2 else samples.shape[2]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    height, width = samples.shape[:2]
    rows = samples.reshape(height, -1).astype(">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 on every row

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def to_16bit(pixels, seed=0):
    """An 8-bit image's 16-bit version: x 257 (PNG's rule), plus noise in the low bits that a
    real 16-bit photo has and its 8-bit copy rounds away (within +-128 of x * 257)."""
    noise = np.random.default_rng(seed).integers(-128, 128, pixels.shape)
    return np.clip(pixels.astype(np.int64) * 257 + noise, 0, 65535).astype(np.uint16)


def imagefolder(root, files, split="val"):
    """An unlabelled ImageFolder split: root/split/NAME for each {NAME: writer(path)}."""
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    for name, write in files.items():
        write(folder / name)
    return root


def first_line_error(result, *words):
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# --- image kinds (issue 15.2) --------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gray I;16 png", "gray I;16B tiff", "gray+alpha 16 png", "rgb 16 png",
                                  "rgba 16 png"])
def test_16_bit_images_give_their_8_bit_copys_pixels(tmp_path, kind):
    rgb = photo(1)
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    eight = gray if "gray" in kind else rgb
    deep = to_16bit(eight)
    path = tmp_path / ("image.tif" if "tiff" in kind else "image.png")
    if kind == "gray I;16 png":
        Image.fromarray(deep).save(path)
        assert Image.open(path).mode == "I;16"
    elif kind == "gray I;16B tiff":
        Image.fromarray(deep.astype(">u2")).save(path)
        assert Image.open(path).mode == "I;16B"
    elif kind == "gray+alpha 16 png":
        write_png16(path, np.stack([deep, np.full_like(deep, 40000)], axis=-1))
    elif kind == "rgb 16 png":
        write_png16(path, deep)
    else:
        write_png16(path, np.concatenate([deep, np.full_like(deep[..., :1], 65535)], axis=-1))
    decoded = decode_image(path, 64).astype(int)
    expected = np.repeat(eight[..., None], 3, axis=2) if eight.ndim == 2 else eight
    assert np.abs(decoded - expected).max() <= 1, "a 16-bit photo must decode as its 8-bit copy (within rounding)"
    assert decoded.mean() < 200, "not the almost-white image of 16-bit values clipped at 255"


def test_32_bit_integer_float_and_1_bit_images_use_the_documented_scales(tmp_path):
    gray = np.asarray(Image.fromarray(photo(2)).convert("L"))
    Image.fromarray(gray.astype(np.int32) * 257).save(tmp_path / "int.tif")            # I: the 16-bit scale
    Image.fromarray(gray.astype(np.float32) / 255).save(tmp_path / "float.tif")        # F: the 0..1 scale
    Image.fromarray(gray > 128).save(tmp_path / "bits.png")                            # 1: 0 or 255
    assert [Image.open(tmp_path / n).mode for n in ("int.tif", "float.tif", "bits.png")] == ["I", "F", "1"]
    for name in ("int.tif", "float.tif"):
        np.testing.assert_array_equal(decode_image(tmp_path / name, 64), np.repeat(gray[..., None], 3, axis=2))
    np.testing.assert_array_equal(decode_image(tmp_path / "bits.png", 64)[..., 0], np.where(gray > 128, 255, 0))


def test_a_16_bit_dataset_loads_as_its_8_bit_copy(tmp_path):
    """Through load_split (and so every script): 16-bit PNGs beside their 8-bit copies."""
    pictures = [photo(seed) for seed in range(3)]
    eight = imagefolder(tmp_path / "eight", {f"{i}.png": lambda p, x=x: Image.fromarray(x).save(p)
                                             for i, x in enumerate(pictures)})
    deep = imagefolder(tmp_path / "deep", {f"{i}.png": lambda p, x=x: write_png16(p, to_16bit(x))
                                           for i, x in enumerate(pictures)})
    difference = load_split(deep, "val", cache_dir=None).images.int() - load_split(eight, "val", cache_dir=None).images.int()
    assert difference.abs().max() <= 1


def test_decompression_bomb_is_refused_in_one_line_skipped_or_allowed(tmp_path):
    # 13,400 x 13,400 = 179.6 million pixels, over twice Pillow's limit (where Pillow itself
    # raises): a 1-bit PNG of one colour, a few kilobytes on disk.
    data = imagefolder(tmp_path / "d", {"scan.png": lambda p: Image.new("1", (13_400, 13_400)).save(p),
                                        "photo.png": lambda p: Image.fromarray(photo()).save(p)})
    scan = data / "val" / "scan.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning would fail the test
        with pytest.raises(BadImageError, match="scan.png: 13400 x 13400 = 179,560,000 pixels, over the limit of "
                                                "89,478,485 .* --max-image-pixels"):
            decode_image(scan, 64)
    with pytest.raises(BadImageError, match="scan.png.*89,478,485"):
        load_split(data, "val", cache_dir=None)
    split = load_split(data, "val", skip_bad_images=True, cache_dir=None)
    assert split.filenames == ["val/photo.png"]
    # The limit is the user's to move: a 64 x 64 photo is 4096 pixels.
    small = data / "val" / "photo.png"
    with pytest.raises(BadImageError, match="4,096 pixels, over the limit of 4,000"):
        decode_image(small, 64, max_pixels=4000)
    assert decode_image(small, 64, max_pixels=4096).shape == (64, 64, 3)


def test_bomb_through_a_script_is_one_line(tmp_path):
    data = imagefolder(tmp_path / "d", {"scan.png": lambda p: Image.new("1", (13_400, 13_400)).save(p)},
                       split="train")
    result = run_main("train.py", "--data", data, "--model", "cnn3", "--out", tmp_path / "o", check=False)
    first_line_error(result, "scan.png", "89,478,485", "--max-image-pixels")


def test_every_extension_pillow_reads_is_accepted_and_others_are_counted(tmp_path, capsys):
    jpeg = lambda p: Image.fromarray(photo()).save(p, format="JPEG", quality=95)  # noqa: E731
    data = imagefolder(tmp_path / "d", {"a.jfif": jpeg, "b.JPE": jpeg, "c.webp": lambda p: Image.fromarray(
        photo()).save(p, format="WEBP", lossless=True), "notes.txt": lambda p: p.write_text("not an image"),
        ".DS_Store": lambda p: p.write_bytes(b"\0")})
    split = load_split(data, "val", cache_dir=None)
    assert split.filenames == ["val/a.jfif", "val/b.JPE", "val/c.webp"]
    assert torch.equal(split.images[2], torch.from_numpy(photo()).permute(2, 0, 1)), "lossless WebP decodes exactly"
    warning = capsys.readouterr().err
    assert "skipped 1 file(s) whose extension Pillow does not read" in warning, warning


# --- dataset files as tools write them (issue 15.3) ------------------------------------------------

def small_csv_dataset(demo_data, dest, encoding="utf-8", newline="\n", bom=False, rename=None):
    """The demo target task's val rows (a quarter), its CSV written as a tool would."""
    (dest / "images").mkdir(parents=True)
    with open(demo_data / "landmarks.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["task"] == "target" and r["partition"] == "val"][::4]
    for r in rows:
        name = rename(r["filename"]) if rename else r["filename"]
        (dest / "images" / name).write_bytes((demo_data / "images" / r["filename"]).read_bytes())
        r["filename"] = name
    lines = [",".join(rows[0])] + [",".join(r.values()) for r in rows]
    text = ("\ufeff" if bom else "") + newline.join(lines) + newline
    (dest / "landmarks.csv").write_bytes(text.encode(encoding))
    return dest, rows


def test_csv_with_byte_order_mark_and_crlf_reads_its_rows(demo_data, tmp_path):
    data, rows = small_csv_dataset(demo_data, tmp_path / "d", bom=True, newline="\r\n")
    assert (data / "landmarks.csv").read_bytes().startswith(b"\xef\xbb\xbffilename,")
    split = load_split(data, "val", "target", cache_dir=None)
    assert split.filenames == [r["filename"] for r in rows]
    assert split.labels.tolist() == [int(r["numeric_label"]) for r in rows]
    original = load_split(demo_data, "val", "target", cache_dir=None)
    by_name = dict(zip(original.filenames, original.images))
    assert all(torch.equal(image, by_name[name]) for name, image in zip(split.filenames, split.images))


def test_legacy_encoded_csv_is_refused_in_one_line(demo_data, tmp_path):
    data, _ = small_csv_dataset(demo_data, tmp_path / "d", encoding="cp1252", rename=lambda n: "café_" + n)
    result = run_main("train.py", "--data", data, "--task", "target", "--out", tmp_path / "o", check=False)
    first_line_error(result, "landmarks.csv", "not UTF-8", "0xe9", "line 2")


def test_symbolic_links_in_images_are_followed_and_named_when_broken(demo_data, tmp_path):
    data, rows = small_csv_dataset(demo_data, tmp_path / "d")
    elsewhere = tmp_path / "store"
    elsewhere.mkdir()
    # As dataset caches lay files out: images/ holds links to files kept elsewhere, under other names.
    for i, r in enumerate(rows):
        target = elsewhere / f"blob{i}"
        (data / "images" / r["filename"]).rename(target)
        (data / "images" / r["filename"]).symlink_to(target)
    linked = load_split(data, "val", "target", cache_dir=None)
    original = load_split(demo_data, "val", "target", cache_dir=None)
    by_name = dict(zip(original.filenames, original.images))
    assert [r["filename"] for r in rows] == linked.filenames
    assert all(torch.equal(image, by_name[name]) for name, image in zip(linked.filenames, linked.images))
    (elsewhere / "blob0").unlink()
    with pytest.raises(BadImageError, match=rf"{rows[0]['filename']} \(a symbolic link to .*blob0, which does not exist\)"):
        load_split(data, "val", "target", cache_dir=None)


def test_names_escaping_images_are_refused_as_written(demo_data, tmp_path):
    data, rows = small_csv_dataset(demo_data, tmp_path / "d")
    (data / "images" / "sub").mkdir()
    text = (data / "landmarks.csv").read_text().replace(rows[0]["filename"], "sub/../" + rows[0]["filename"])
    (data / "landmarks.csv").write_text(text)
    with pytest.raises(UserError, match=r"'sub/\.\./.*' points outside .*absolute paths and '\.\.' are refused"):
        load_split(data, "val", "target", cache_dir=None)


# --- resize policy (issue 17.3) ----------------------------------------------------------------------

def test_resize_policies_on_a_4_by_3_photo(tmp_path):
    wide = Image.fromarray(photo(3, 96)).resize((96, 72))
    wide.save(tmp_path / "wide.png")
    squash, crop, pad = (decode_image(tmp_path / "wide.png", 48, policy) for policy in ("squash", "crop", "pad"))
    np.testing.assert_array_equal(squash, np.asarray(wide.resize((48, 48), Image.Resampling.BILINEAR)))
    np.testing.assert_array_equal(crop, np.asarray(wide.crop((12, 0, 84, 72)).resize((48, 48), Image.Resampling.BILINEAR)))
    np.testing.assert_array_equal(pad[6:42], np.asarray(wide.resize((48, 36), Image.Resampling.BILINEAR)))
    assert not pad[:6].any() and not pad[42:].any(), "letterbox bars are black"
    with pytest.raises(UserError, match="--resize 'stretch': must be one of squash, crop, pad"):
        decode_image(tmp_path / "wide.png", 48, "stretch")


def test_large_jpeg_is_decoded_in_draft_mode(tmp_path):
    big = Image.fromarray(photo(4, 64)).resize((512, 384), Image.Resampling.BICUBIC)
    big.save(tmp_path / "big.jpg", quality=95)
    decoded = decode_image(tmp_path / "big.jpg", 64)
    with Image.open(tmp_path / "big.jpg") as image:
        image.draft("RGB", (64, 64))
        assert image.size == (128, 96), "scaled by 1/4 while decoding"
        expected = np.asarray(image.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(decoded, expected)
    full = np.asarray(Image.open(tmp_path / "big.jpg").convert("RGB").resize((64, 64), Image.Resampling.BILINEAR))
    assert np.abs(decoded.astype(int) - full).mean() < 4, "still the same picture"


@pytest.fixture(scope="module")
def policy_models(target_run, tmp_path_factory):
    """target_run's model under each resize policy: checkpoint and ONNX export. The network is the
    same; the policy is a fact of the checkpoint (and after export of the metadata) that every
    later step must apply, so one export is re-stamped instead of exporting three times."""
    folder = tmp_path_factory.mktemp("policies")
    checkpoint = load_checkpoint(target_run / "best.pt")
    save_checkpoint({**checkpoint, "resize": "crop"}, folder / "crop.pt")
    run_main("export.py", "--checkpoint", folder / "crop.pt", "--out", folder / "crop.onnx")
    assert read_metadata(folder / "crop.onnx")["resize"] == "crop", "export.py records the checkpoint's policy"
    for policy in ("squash", "pad"):
        save_checkpoint({**checkpoint, "resize": policy}, folder / f"{policy}.pt")
        (folder / f"{policy}.onnx").write_bytes((folder / "crop.onnx").read_bytes())
        stamp_metadata(folder / f"{policy}.onnx", {"resize": policy})
    return folder


def test_predict_gives_evaluates_probabilities_on_4_by_3_photos_for_each_policy(policy_models, tmp_path):
    photos = imagefolder(tmp_path / "photos", {
        f"{i}.jpg": lambda p, i=i: Image.fromarray(photo(i, 128)).resize((128, 96)).save(p, quality=90)
        for i in range(4)}, split="challenge")
    by_policy = {}
    for policy in ("squash", "crop", "pad"):
        run_main("evaluate.py", "--checkpoint", policy_models / f"{policy}.pt", "--data", photos,
                 "--split", "challenge", "--out", tmp_path / f"eval-{policy}")
        with open(tmp_path / f"eval-{policy}" / "predictions.csv") as f:
            evaluated = {row["filename"]: [float(row["prob_portico_rotunda"]), float(row["prob_palace"])]
                         for row in csv.DictReader(f)}
        result = run_main("predict.py", policy_models / f"{policy}.onnx", photos / "challenge", "--json",
                          "--top-k", "2")
        predicted = {str(Path(r["file"]).relative_to(photos)): {p["label"]: p["probability"] for p in r["predictions"]}
                     for r in json.loads(result.stdout)}
        assert sorted(predicted) == sorted(evaluated)
        for name, probs in evaluated.items():
            onnx_probs = [predicted[name]["portico_rotunda"], predicted[name]["palace"]]
            # predictions.csv rounds to 6 decimals (5e-7); the float ONNX graph and PyTorch agree to 1e-6.
            assert np.abs(np.subtract(probs, onnx_probs)).max() <= 1e-6 + 5e-7, (policy, name, probs, onnx_probs)
        by_policy[policy] = np.array([evaluated[name] for name in sorted(evaluated)])
    assert np.abs(by_policy["squash"] - by_policy["crop"]).max() > 1e-4, "the policies must see different pixels"
    assert np.abs(by_policy["squash"] - by_policy["pad"]).max() > 1e-4


def test_resume_refuses_another_resize_policy(target_run, demo_data):
    result = run_main("train.py", "--data", demo_data, "--task", "target", "--model", "cnn3", "--epochs", "3",
                      "--warmup-epochs", "0", "--ema", "0", "--out", target_run, "--resume", "--resize", "crop",
                      check=False)
    first_line_error(result, "--resize", "squash")


def test_transfer_keeps_the_sources_policy():
    from lib.transfer import target_describe
    source = {"model": "cnn3", "classes": ["x", "y"], "image_size": 64, "resize": "pad", "mean": [0.5] * 3,
              "std": [0.2] * 3}
    assert target_describe(source, "target", ["a", "b"], {}, {})["resize"] == "pad"
    del source["resize"]
    assert target_describe(source, "target", ["a", "b"], {}, {})["resize"] == "squash", "older checkpoints squash"


# --- predict.py and bad images -------------------------------------------------------------------------

def test_predict_skips_bad_images_when_asked_and_reports_them_per_file(policy_models, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(photo(5)).save(folder / "a.png")
    (folder / "b.png").write_bytes(b"not a picture")
    Image.fromarray(photo(6)).save(folder / "c.jpe", format="JPEG")
    (folder / "d.txt").write_text("notes")
    model = policy_models / "squash.onnx"
    stopped = run_main("predict.py", model, folder, check=False)
    first_line_error(stopped, "b.png", "not a readable image")
    result = run_main("predict.py", model, folder, "--json", "--skip-bad-images")
    rows = json.loads(result.stdout)
    assert [Path(r["file"]).name for r in rows] == ["a.png", "b.png", "c.jpe"]
    assert "not a readable image" in rows[1]["error"] and "predictions" in rows[0] and "predictions" in rows[2]
    assert "skipped" in result.stderr and "b.png" in result.stderr
    assert "skipped 1 file(s) whose extension Pillow does not read" in result.stderr
    text = run_main("predict.py", model, folder, "--skip-bad-images")
    assert [line.split("\t")[0] for line in text.stdout.splitlines()] == [str(folder / "a.png"), str(folder / "c.jpe")]


def test_predict_leaves_hidden_files_and_folders_out(policy_models, tmp_path):
    """As the ImageFolder loader does: Jupyter's .ipynb_checkpoints/ holds copies, not more photos."""
    folder = tmp_path / "photos"
    for relative in ("a.png", "sub/b.png", ".ipynb_checkpoints/a-checkpoint.png", "sub/.cache/c.png", ".d.png"):
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo(5)).save(folder / relative)
    result = run_main("predict.py", policy_models / "squash.onnx", folder, "--json")
    assert [r["file"] for r in json.loads(result.stdout)] == [str(folder / "a.png"), str(folder / "sub" / "b.png")]
    assert "skipped" not in result.stderr, "hidden files are not counted as files of another type"
