"""lib.preprocessing: one record of a model's input facts, read from a checkpoint or an ONNX model's metadata."""
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO
from lib.checkpoint import read_preprocessing
from lib.errors import UserError
from lib.preprocessing import Preprocessing

CHECKPOINT = {"model": "resnet18", "stem": "stock", "classes": ["a", "b"], "image_size": 96, "resize": "crop",
              "mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.15]}


def test_a_checkpoint_gives_its_record():
    assert read_preprocessing(CHECKPOINT) == Preprocessing(
        image_size=96, resize="crop", mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.15), classes=("a", "b"),
        model="resnet18", stem="stock")


@pytest.mark.parametrize("image_size, stem", [(64, "no-maxpool"), (128, "stock")])
def test_an_older_checkpoint_gets_what_it_was_made_with(image_size, stem):
    """Checkpoints from before --resize squashed, and from before the stem entry a ResNet under
    128 px had no max-pool; the record says so, so nothing downstream has to."""
    older = {k: v for k, v in CHECKPOINT.items() if k not in ("stem", "resize")}
    facts = read_preprocessing({**older, "image_size": image_size})
    assert (facts.resize, facts.stem) == ("squash", stem)
    assert read_preprocessing({**older, "stem": None}) == read_preprocessing(older)


@pytest.mark.parametrize("changed, message", [({"model": "lenet"}, "model 'lenet' is not one this project builds"),
                                              ({"stem": "tiny"}, "its stem 'tiny' is none of"),
                                              ({"resize": "stretch"}, "resize 'stretch': must be one of")])
def test_a_checkpoint_with_facts_this_project_does_not_know_is_refused(changed, message):
    with pytest.raises(UserError, match=f"^--checkpoint x.pt: .*{re.escape(message)}"):
        read_preprocessing({**CHECKPOINT, **changed}, where="--checkpoint x.pt")


def test_the_onnx_metadata_gives_the_same_record_back():
    facts = read_preprocessing(CHECKPOINT)
    metadata = facts.onnx_metadata()
    assert all(isinstance(value, str) for value in metadata.values()), "metadata_props hold strings"
    assert Preprocessing.from_onnx_metadata(metadata, where="m.onnx") == facts


def test_an_older_onnx_model_squashes_and_may_not_name_its_stem():
    metadata = read_preprocessing(CHECKPOINT).onnx_metadata()
    older = {k: v for k, v in metadata.items() if k not in ("resize", "stem")}
    facts = Preprocessing.from_onnx_metadata(older, where="m.onnx")
    assert (facts.resize, facts.stem, facts.model) == ("squash", None, "resnet18")
    with pytest.raises(UserError, match=r"^m\.onnx: metadata resize 'stretch': must be one of squash, crop, pad$"):
        Preprocessing.from_onnx_metadata({**metadata, "resize": "stretch"}, where="m.onnx")


def test_the_record_is_torch_free(tmp_path):
    """lib.edge reads the record on devices without PyTorch (the boundary tests/test_export.py
    enforces for predict.py): importing it with torch blocked must work."""
    (tmp_path / "torch.py").write_text("raise ImportError('torch is blocked in this test')\n")
    code = ("import json, lib.preprocessing as p; "
            "print(p.Preprocessing.from_onnx_metadata({'image_size': '8', 'mean': '[0, 0, 0]', 'std': '[1, 1, 1]', "
            "'classes': '[\"a\"]'}, where='m').image_size)")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    assert subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True).returncode != 0
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "8", result.stderr


def test_the_defaults_have_one_home():
    """The resize and image-size defaults are written in lib/preprocessing.py and imported everywhere
    else; no script or lib module restates them or reads a checkpoint's resize with a default of its own."""
    sources = {path.relative_to(REPO).as_posix(): path.read_text() for path in
               [*REPO.glob("*.py"), *(REPO / "lib").glob("*.py"), *(REPO / "bench").glob("*.py")]}
    stated = {name for name, text in sources.items() if re.search(r'"squash"|image_size=64\b|_SIZE = 64\b', text)}
    assert stated == {"lib/preprocessing.py"}
    defaulted = {name for name, text in sources.items() if re.search(r'\.get\("(resize|stem)"', text)}
    assert defaulted <= {"lib/preprocessing.py", "lib/checkpoint.py"}, defaulted
