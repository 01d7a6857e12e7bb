"""The default --image-size from the training photos' sizes (lib.data.photo_side, lib.weights.image_size_for)."""
import pytest
from PIL import Image

from conftest import run_main
from lib.checkpoint import load_checkpoint
from lib.data import photo_side
from lib.weights import PHOTO_SIZES, image_size_for


def _photos(root, sizes, classes=("a", "b"), val_per_class=2):
    """An ImageFolder of JPEGs as a camera saves them: each (width, height) in `sizes` once per class
    in train/; val/ of small photos. The first photo is stored sideways with an EXIF rotation."""
    for split, split_sizes in (("train", sizes), ("val", [(96, 72)] * val_per_class)):
        for number, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i, (width, height) in enumerate(split_sizes):
                image = Image.new("RGB", (width, height), (200 * number, 90, 200 - 200 * number))
                exif = Image.Exif()
                if i == 0:
                    image = image.transpose(Image.Transpose.ROTATE_90)
                    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
                image.save(root / split / name / f"{i}.jpg", quality=90, exif=exif)
    return root


def test_photo_side_is_the_median_short_side_read_from_headers(tmp_path):
    data = _photos(tmp_path / "photos", [(400, 300), (160, 120), (2000, 1500)])
    (data / "train" / "a" / "broken.jpg").write_bytes(b"not an image")
    assert photo_side(data) == 300  # short sides 300, 120, 1500 in each class; the broken file is left out


def test_at_most_a_sample_of_headers_is_read(tmp_path, monkeypatch):
    import lib.data
    data = _photos(tmp_path / "photos", [(80, 60)] * 150)  # 300 train files
    read = []
    monkeypatch.setattr(lib.data, "median_short_side", lambda paths: read.append(len(paths)) or 60)
    assert photo_side(data) == 60 and read == [150] and 150 <= lib.data.PHOTO_SIDE_SAMPLE


def test_several_datasets_take_the_smallest_median_so_none_is_upsampled(tmp_path):
    large = _photos(tmp_path / "large", [(400, 300)] * 3)
    small = _photos(tmp_path / "small", [(64, 64)] * 3)
    assert photo_side([large, small]) == 64


@pytest.mark.parametrize("side, expected", [(None, 64), (40, 64), (64, 64), (127, 64), (128, 128), (3000, 128)])
def test_the_largest_measured_size_at_or_below_the_photos_short_side(side, expected):
    assert PHOTO_SIZES == (64, 128)
    assert image_size_for(None, None, side)[0] == expected


def test_train_chooses_128_px_for_large_photos_and_says_why(tmp_path):
    data = _photos(tmp_path / "photos", [(200, 150)] * 3)
    result = run_main("train.py", "--data", data, "--model", "cnn3", "--epochs", "1", "--min-size", "0",
                      "--ema-bn-images", "0", "--out", tmp_path / "run")
    assert "image size 128 px (the training photos' median short side is 150 px; --image-size changes it)" \
        in result.stdout
    assert load_checkpoint(tmp_path / "run" / "model.pt")["image_size"] == 128


def test_given_image_size_wins_over_the_photos(tmp_path):
    data = _photos(tmp_path / "photos", [(200, 150)] * 3)
    result = run_main("train.py", "--data", data, "--model", "cnn3", "--epochs", "1", "--image-size", "48",
                      "--min-size", "0", "--out", tmp_path / "run")
    assert "image size 48 px (--image-size)" in result.stdout
    assert load_checkpoint(tmp_path / "run" / "model.pt")["image_size"] == 48


def test_small_photos_keep_the_landmark_recipes_64_px(demo_data, tmp_path):
    result = run_main("train.py", "--data", demo_data, "--task", "target", "--model", "cnn3", "--epochs", "1",
                      "--out", tmp_path / "run")
    assert "image size 64 px (the training photos' median short side is 64 px" in result.stdout
