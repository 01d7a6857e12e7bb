"""--weights: torchvision's published weights by name (from its cache, never downloaded here: the
network is blocked), their preprocessing and lineage; state_dict files saved by wrapped models
or older PyTorch."""
import json
import re
import socket

import pytest
import torch
import torchvision

from conftest import run_main
from lib import weights
from lib.checkpoint import file_hash, load_checkpoint
from lib.errors import UserError
from lib.models import build_model
from lib.onnx_export import model_metadata

NAME = "shufflenet_v2_x0_5"  # the smallest registered model with published weights (1.4 M parameters)
PUBLISHED = torchvision.models.ShuffleNet_V2_X0_5_Weights.IMAGENET1K_V1
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _one_line_error(result, *needles):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


@pytest.fixture
def no_network(monkeypatch):
    """Every connection fails, as on a machine without network: nothing can be downloaded."""
    def unreachable(*args, **kwargs):
        raise OSError(101, "Network is unreachable (blocked by the test)")
    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(socket, "getaddrinfo", unreachable)
    monkeypatch.setattr(socket.socket, "connect", unreachable)


@pytest.fixture
def torch_home(tmp_path, monkeypatch, no_network):
    """An empty TORCH_HOME; returns the folder torchvision's loader caches weights in."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture
def cached(torch_home):
    """PUBLISHED's file in the cache, as a download would leave it: a state_dict of its shapes
    (random values: the tests need the shapes and names, not ImageNet)."""
    torch_home.mkdir(parents=True)
    torch.manual_seed(3)
    path = torch_home / "shufflenetv2_x0.5-f707e7126e.pth"
    torch.save(torchvision.models.get_model(NAME, weights=None).state_dict(), path)
    return path


def test_the_cache_path_is_torchvisions(cached):
    assert weights.cache_path(PUBLISHED.url) == cached


@pytest.mark.parametrize("value", ["IMAGENET1K_V1", "DEFAULT", "ShuffleNet_V2_X0_5_Weights.IMAGENET1K_V1"])
def test_published_weights_by_name_fill_every_tensor_but_the_head(cached, value):
    file = torch.load(cached, weights_only=True)
    model = build_model(NAME, 2, 32)
    start = weights.open_weights(NAME, value)
    lineage = weights.load_weights(model, NAME, start)
    for key, tensor in model.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(tensor, file[key]), key
    assert lineage == {"weights": "ShuffleNet_V2_X0_5_Weights.IMAGENET1K_V1", "weights_url": PUBLISHED.url,
                       "weights_sha256": file_hash(cached)}
    assert (start.mean, start.std, start.image_size) == (IMAGENET_MEAN, IMAGENET_STD, 224)


def test_train_with_published_weights_uses_their_preprocessing_and_records_them(cached, demo_data, tmp_path):
    result = run_main("train.py", "--data", demo_data, "--task", "target", "--model", NAME, "--weights", "DEFAULT",
                      "--epochs", "1", "--batch-size", "40", "--min-size", "0", "--out", tmp_path / "run")
    checkpoint = load_checkpoint(tmp_path / "run" / "best.pt")
    assert checkpoint["image_size"] == 224 and checkpoint["args"]["image_size"] == 224
    assert checkpoint["mean"] == IMAGENET_MEAN and checkpoint["std"] == IMAGENET_STD
    assert "image size 224 px (the resolution ShuffleNet_V2_X0_5_Weights.IMAGENET1K_V1 was trained at" in result.stdout
    assert (f"weights: ShuffleNet_V2_X0_5_Weights.IMAGENET1K_V1 from torchvision ({cached}) (all but the head); "
            f"normalising with mean 0.485 0.456 0.406 std 0.229 0.224 0.225 "
            f"(ShuffleNet_V2_X0_5_Weights.IMAGENET1K_V1's own") in result.stdout
    # The test's file is not the published one, so its sha256 does not start with the name's f707e7126e.
    assert "does not have the sha256 its name promises (f707e7126e...)" in result.stderr
    lineage = {"weights": "ShuffleNet_V2_X0_5_Weights.IMAGENET1K_V1", "weights_url": PUBLISHED.url,
               "weights_sha256": file_hash(cached)}
    assert checkpoint["lineage"] == {**lineage, "data": [str(demo_data.resolve())]}
    metadata = model_metadata(checkpoint, "0" * 64, False, 18, {}, 0.04)
    assert json.loads(metadata["weights"]) == {"name": lineage["weights"], "url": PUBLISHED.url,
                                               "sha256": lineage["weights_sha256"]}


def test_given_image_size_and_statistics_win_over_the_weights(cached, demo_data, tmp_path):
    result = run_main("train.py", "--data", demo_data, "--task", "target", "--model", NAME, "--weights",
                      "IMAGENET1K_V1", "--image-size", "32", "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25",
                      "0.25", "--epochs", "1", "--batch-size", "40", "--out", tmp_path / "run")
    checkpoint = load_checkpoint(tmp_path / "run" / "best.pt")
    assert (checkpoint["image_size"], checkpoint["mean"], checkpoint["std"]) == (32, [0.5] * 3, [0.25] * 3)
    assert "image size 32 px (--image-size)" in result.stdout and "(--mean/--std)" in result.stdout


def test_without_network_or_cache_one_line_names_the_url_and_the_cache_path(torch_home, demo_data, tmp_path):
    result = run_main("train.py", "--data", demo_data, "--task", "target", "--model", NAME, "--weights", "DEFAULT",
                      "--out", tmp_path / "run", check=False)
    path = torch_home / "shufflenetv2_x0.5-f707e7126e.pth"
    _one_line_error(result, "train.py: error: --weights DEFAULT: ShuffleNet_V2_X0_5_Weights.IMAGENET1K_V1 is not "
                            "cached and could not be downloaded (", "Network is unreachable",
                    f"; download {PUBLISHED.url} and put it at {path}")
    assert not path.exists() and not list(torch_home.iterdir())
    assert not (tmp_path / "run").exists(), "refused before --out is made"


def test_an_unreadable_cached_file_is_named(torch_home):
    torch_home.mkdir(parents=True)
    (torch_home / "shufflenetv2_x0.5-f707e7126e.pth").write_bytes(b"not a state_dict")
    with pytest.raises(UserError, match=r"^--weights DEFAULT: the cached file .*shufflenetv2_x0.5-f707e7126e.pth "
                                        r"is not readable .*; delete it to download "):
        weights.open_weights(NAME, "DEFAULT")


def test_names_a_model_does_not_have_are_refused_in_one_line(demo_data, tmp_path, no_network):
    def train(model, value):
        return run_main("train.py", "--data", demo_data, "--task", "target", "--model", model, "--weights", value,
                        "--out", tmp_path / "run", check=False)
    _one_line_error(train("fastnet", "DEFAULT"), "--weights DEFAULT: fastnet has no published weights")
    _one_line_error(train("cnn3", "IMAGENET1K_V1"), "--weights IMAGENET1K_V1: cnn3 has no published weights")
    _one_line_error(train("resnet18", "IMAGENET1K_V2"), "--weights IMAGENET1K_V2: no such file, nor published "
                    "weights of resnet18 (torchvision has ResNet18_Weights: DEFAULT, IMAGENET1K_V1)")
    _one_line_error(train("resnet18", "ResNet50_Weights.IMAGENET1K_V1"), "no such file, nor published weights "
                    "of resnet18")
    _one_line_error(train("resnet18", str(tmp_path / "missing.pth")), "missing.pth: no such file")


@pytest.fixture
def mobilenet_state():
    torch.manual_seed(4)
    return torchvision.models.mobilenet_v3_small(weights=None).state_dict()


@pytest.mark.parametrize("saved_as", ["older PyTorch", "module.", "_orig_mod.", "module._orig_mod.",
                                      "_orig_mod.module."])
def test_state_dicts_of_wrapped_models_and_older_pytorch_load(mobilenet_state, tmp_path, saved_as):
    """DataParallel/DistributedDataParallel save names under module., torch.compile under _orig_mod.;
    PyTorch before 0.4.1 saved BatchNorm without num_batches_tracked, and load_state_dict accepts that."""
    if saved_as == "older PyTorch":
        state = {k: v for k, v in mobilenet_state.items() if not k.endswith("num_batches_tracked")}
    else:
        state = {saved_as + k: v for k, v in mobilenet_state.items()}
    torch.save(state, tmp_path / "weights.pth")
    model = build_model("mobilenet_v3_small", 2, 32)
    weights.load_weights(model, "mobilenet_v3_small", weights.open_weights("mobilenet_v3_small", tmp_path / "weights.pth"))
    for key, tensor in model.state_dict().items():
        if not key.startswith("classifier.3.") and not key.endswith("num_batches_tracked"):
            assert torch.equal(tensor, mobilenet_state[key]), key


def _cache(torch_home, choice, state):
    torch_home.mkdir(parents=True, exist_ok=True)
    torch.save(state, weights.cache_path(choice.url))


def test_densenet_weights_in_torchvisions_old_names_load(torch_home):
    """torchvision's DenseNet files (2017: before num_batches_tracked) name 'norm.1' what the model
    calls 'norm1' (its builder renames them)."""
    torch.manual_seed(5)
    state = torchvision.models.densenet121(weights=None).state_dict()
    old_names = {re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", key): value
                 for key, value in state.items() if not key.endswith("num_batches_tracked")}
    assert old_names.keys() != state.keys()
    _cache(torch_home, torchvision.models.DenseNet121_Weights.DEFAULT, old_names)
    model = build_model("densenet121", 2, 32)
    weights.load_weights(model, "densenet121", weights.open_weights("densenet121", "DEFAULT"))
    assert torch.equal(model.state_dict()["features.denseblock4.denselayer16.conv2.weight"],
                       state["features.denseblock4.denselayer16.conv2.weight"])


def test_googlenet_weights_get_the_unit_range_their_builder_converts_to(torch_home):
    """torchvision builds GoogLeNet with transform_input=True for its weights, mapping ImageNet-normalised
    input to (x - 0.5) / 0.5; without that layer the same numbers come from mean = std = 0.5."""
    _cache(torch_home, torchvision.models.GoogLeNet_Weights.DEFAULT,
           torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False).state_dict())
    start = weights.open_weights("googlenet", "DEFAULT")
    assert (start.mean, start.std, start.image_size) == ([0.5] * 3, [0.5] * 3, 224)
    weights.load_weights(build_model("googlenet", 2, 64), "googlenet", start)  # the auxiliary heads are skipped
