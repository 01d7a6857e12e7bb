"""Every architecture by name: what each record promises, six device-sized models through the
whole pipeline, a torchvision state_dict as the starting point (--weights), one-line refusals."""
import copy
import csv
import json

import numpy as np
import pytest
import torch
import torchvision

from conftest import run_main
from lib import cam
from lib.checkpoint import FORMAT, build_from_checkpoint, file_hash, load_checkpoint, save_checkpoint
from lib.edge import OnnxClassifier
from lib.errors import UserError
from lib.flops import inference_flops
from lib.models import (FAMILIES, MODELS, architecture, build_model, cam_reshape, default_cam_layer, head_name,
                        meta_device, reference_model, replace_head, resolve_stem, stage_names, stages)
from lib.transfer import build_target, freeze_stages
from lib.weights import load_weights, open_weights

# The device-sized torchvision models issue 17 names (0.04-0.26 GFLOP per 128 px image): inverted
# residuals with hard-swish and squeeze-excitation (MobileNetV3-Small/Large), channel shuffle, MBConv
# with SiLU and stochastic depth, RegNet's grouped bottlenecks; and ConvNeXt for a network without
# BatchNorm (LayerNorm, GELU). Each whole pipeline costs about 25 CPU-seconds, mostly the ONNX
# export; the other architectures are checked on the meta device only.
PIPELINE_MODELS = ["mobilenet_v3_small", "mobilenet_v3_large", "shufflenet_v2_x1_0", "efficientnet_b0",
                   "regnet_y_400mf", "convnext_tiny"]
SIZE = 224  # lib.models' reference size, at which every model runs


def _parameter_names(model, dotted):
    part = model.get_submodule(dotted) if dotted in dict(model.named_modules()) else None
    if part is None:
        return {dotted}  # a bare parameter (ViT's class token)
    return {f"{dotted}.{name}" for name, _ in part.named_parameters()}


def test_the_registry_holds_every_torchvision_classification_model():
    names = set(torchvision.models.list_models(module=torchvision.models))
    assert names <= set(MODELS) and set(MODELS) - names == {"fastnet", "cnn3"}


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_builds_runs_and_names_its_stages_head_and_cam_layer(name):
    model = replace_head(copy.deepcopy(reference_model(name)), name, 5)  # on the meta device, at 224 px
    # One forward pass, the one lib.flops counts, with the head's and the Grad-CAM layer's outputs kept.
    outputs = {}
    for key, path in (("logits", head_name(name)), ("map", default_cam_layer(name))):
        model.get_submodule(path).register_forward_hook(
            lambda module, inputs, output, key=key: outputs.__setitem__(key, output))
    assert inference_flops(model, SIZE) > 0
    assert outputs["logits"].shape[:2] == (2, 5), "the replaced head is the one that classifies"
    reshape = cam_reshape(name)
    cam_map = reshape(outputs["map"]) if reshape else outputs["map"]
    assert cam_map.dim() == 4 and cam_map.shape[0] == 2 and cam_map.shape[2] == cam_map.shape[3], cam_map.shape
    if architecture(name).cam_layout != "tokens":  # ViT's one resolution is its patch grid
        assert SIZE // 32 < cam_map.shape[2] < SIZE, f"Grad-CAM layer at {cam_map.shape[2]} px of {SIZE}"
    # Every parameter is in exactly one stage or in the head, and every stage has some.
    names = stage_names(name)
    assert len(stages(model, name)) == len(names) >= 3
    owners = [_parameter_names(model, dotted) for stage in names for dotted in stage]
    head = _parameter_names(model, head_name(name))
    every = [p for group in owners for p in group] + sorted(head)
    assert sorted(every) == sorted(n for n, _ in model.named_parameters()), "a parameter in no or two places"
    assert all(set().union(*(_parameter_names(model, d) for d in stage)) for stage in names), "a stage without weights"


@pytest.mark.parametrize("name", [family.names[0] for family in FAMILIES])
def test_a_replaced_head_is_rebuilt_from_its_checkpoint(name):
    """What transfer.py saves after replace_head, evaluate/explain/export rebuild from the checkpoint:
    the same tensors in every family (MaxViT's head has no bias); on the meta device, at 224 px."""
    replaced = replace_head(copy.deepcopy(reference_model(name)), name, 5)
    checkpoint = {"model": name, "classes": list("abcde"), "image_size": SIZE, "state_dict": replaced.state_dict()}
    with meta_device():
        rebuilt = build_from_checkpoint(checkpoint)
    shapes = {key: value.shape for key, value in replaced.state_dict().items()}
    assert {key: value.shape for key, value in rebuilt.state_dict().items()} == shapes


def test_a_transferred_maxvit_round_trips_and_a_misfit_names_its_tensor(tmp_path):
    source = {"format": FORMAT, "model": "maxvit_t", "classes": ["a", "b", "c"], "image_size": SIZE,
              "mean": [0.5] * 3, "std": [0.25] * 3, "state_dict": build_model("maxvit_t", 3, SIZE).state_dict()}
    target, _ = build_target(source, "source.pt", 2, 0, seed=0)
    save_checkpoint({**source, "classes": ["x", "y"], "state_dict": target.state_dict()}, tmp_path / "target.pt")
    rebuilt = build_from_checkpoint(load_checkpoint(tmp_path / "target.pt"))
    assert all(torch.equal(value, target.state_dict()[key]) for key, value in rebuilt.state_dict().items())
    extra = {**source, "state_dict": {**source["state_dict"], "classifier.5.bias": torch.zeros(3)}}
    with pytest.raises(UserError, match=r"weights do not fit model 'maxvit_t' \(Unexpected key\(s\) in state_dict: "
                                        r"\"classifier.5.bias\""):
        build_from_checkpoint(extra, "checkpoint extra.pt")


def _one_line_error(result, *needles):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_a_model_that_cannot_run_at_the_size_is_refused_in_one_line(demo_data, tmp_path):
    def train(*args):
        return run_main("train.py", "--data", demo_data, "--task", "target", "--epochs", "1",
                        "--out", tmp_path / "run", *args, check=False)
    _one_line_error(train("--model", "maxvit_t"),
                    "train.py: error: --image-size 64: maxvit_t needs a multiple of 224 px (its 7x7 attention")
    _one_line_error(train("--model", "vit_b_16", "--image-size", "40"),
                    "--image-size 40: vit_b_16 needs a multiple of 16 px")
    _one_line_error(train("--model", "inception_v3"), "--image-size 64: inception_v3 cannot run on 64 px images (")
    # Progressive resizing would start below what the model takes: the flag and a size that works.
    _one_line_error(train("--model", "inception_v3", "--image-size", "96", "--epochs", "4"),
                    "--min-size 32: inception_v3 cannot run on 32 px images (", "; use --min-size 75 or more, or 0")
    assert not (tmp_path / "run" / "last.pt").exists(), "refused before training"


@pytest.fixture(scope="module")
def imagenet_like_weights(tmp_path_factory):
    """torchvision-format state_dict files as a user brings them: ImageNet's 1000 classes."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(1)
    files = {}
    for name in ("mobilenet_v3_small", "resnet18"):
        files[name] = folder / f"{name}.pth"
        torch.save(torchvision.models.get_model(name, weights=None).state_dict(), files[name])
    return files


@pytest.mark.parametrize("name", PIPELINE_MODELS)
def test_device_sized_models_go_through_the_whole_pipeline(name, demo_data, imagenet_like_weights, tmp_path):
    """train (1 epoch, 32 px), evaluate, explain, export with int8, predict, all as typed by a user.
    MobileNetV3-Small starts from a state_dict file with ImageNet's mean/std, as most users would,
    and is then transferred to another task with its first two stages frozen."""
    run = tmp_path / "run"
    start = (["--weights", imagenet_like_weights[name], "--mean", "0.485", "0.456", "0.406",
              "--std", "0.229", "0.224", "0.225"] if name in imagenet_like_weights else [])
    trained = run_main("train.py", "--data", demo_data, "--task", "target", "--model", name, "--image-size", "32",
                       "--epochs", "1", "--batch-size", "8", "--out", run, *start)
    checkpoint = load_checkpoint(run / "best.pt")
    assert (checkpoint["model"], checkpoint["image_size"]) == (name, 32)
    run_main("evaluate.py", "--checkpoint", run / "best.pt", "--data", demo_data, "--task", "target",
             "--split", "val", "--out", tmp_path / "eval")
    with open(tmp_path / "eval" / "predictions.csv") as f:
        evaluated = list(csv.DictReader(f))
    run_main("explain.py", "--checkpoint", run / "best.pt", "--data", demo_data, "--task", "target",
             "--num-images", "2", "--out", tmp_path / "cam")
    cam_stats = json.loads((tmp_path / "cam" / "cam_stats.json").read_text())
    assert cam_stats["models"][0]["layers"] == [default_cam_layer(name)]
    assert len(cam_stats["images"]) == 2
    # The int8 gate is not what this test is about: a one-epoch model's probabilities sit near
    # 0.5, where int8 rounding may swap a few top classes. Nor is the fp32 tolerance: a one-epoch
    # 32-px EfficientNet, its BatchNorm statistics re-estimated on 64 images, differs from
    # onnxruntime by 1.1e-4 in its rounding; a preprocessing mistake differs by far more than 1e-3.
    exported = run_main("export.py", "--checkpoint", run / "best.pt", "--out", tmp_path / "model.onnx",
                        "--quantize", "int8", "--calibration-images", "16", "--min-confident-agreement", "0.01",
                        "--max-accuracy-loss", "1", "--max-auroc-loss", "1", "--tolerance", "1e-3")
    assert "int8 gate passed" in exported.stdout, exported.stdout
    files = [demo_data / "images" / row["filename"] for row in evaluated[:6]]
    for model_file in ("model.onnx", "model.int8.onnx"):
        predicted = json.loads(run_main("predict.py", tmp_path / model_file, *files, "--json",
                                        "--top-k", "2").stdout)
        probs = np.array([[p["probability"] for p in sorted(item["predictions"], key=lambda p: p["label"])]
                          for item in predicted])
        expected = np.array([[float(row[f"prob_{c}"]) for c in sorted(checkpoint["classes"])] for row in evaluated[:6]])
        # fp32: what evaluate.py computed in PyTorch; int8: a probability distribution of every
        # class (how near it is to fp32 is the gate's business, measured on the val split).
        if model_file == "model.onnx":
            np.testing.assert_allclose(probs, expected, atol=1e-3)
        else:
            assert probs.shape == expected.shape and ((probs >= 0) & (probs <= 1)).all()
            np.testing.assert_allclose(probs.sum(1), 1, atol=1e-4)
    metadata = OnnxClassifier(tmp_path / "model.int8.onnx").metadata
    assert metadata["architecture"] == name
    if start:
        weights = {"path": str(imagenet_like_weights[name].resolve()),
                   "sha256": file_hash(imagenet_like_weights[name])}
        assert json.loads(metadata["weights"]) == weights
        assert checkpoint["lineage"] == {"weights": weights["path"], "weights_sha256": weights["sha256"],
                                         "data": [str(demo_data.resolve())]}
        assert json.loads(metadata["mean"]) == pytest.approx([0.485, 0.456, 0.406])
        assert f"weights: from {imagenet_like_weights[name]} (all but the head); normalising with mean 0.485 " \
               "0.456 0.406 std 0.229 0.224 0.225 (--mean/--std)" in trained.stdout
        # Transfer to the 8-class task with the stem and the next stage (by resolution) frozen.
        run_main("transfer.py", "--source", run / "best.pt", "--data", demo_data, "--task", "source",
                 "--freeze", "2", "--epochs", "1", "--out", tmp_path / "transfer")
        target = load_checkpoint(tmp_path / "transfer" / "best.pt")
        frozen = [k for k in checkpoint["state_dict"] if k.startswith(("features.0.", "features.1."))]
        assert frozen and all(torch.equal(checkpoint["state_dict"][k], target["state_dict"][k]) for k in frozen)
        assert not torch.equal(checkpoint["state_dict"]["features.2.block.0.0.weight"],
                               target["state_dict"]["features.2.block.0.0.weight"])
        assert target["state_dict"]["classifier.3.weight"].shape[0] == 8
        assert target["lineage"]["weights_sha256"] == weights["sha256"], "a transferred model keeps its origin"
    else:
        assert json.loads(metadata["weights"]) is None and "weights: random" in trained.stdout


def test_weights_fill_every_tensor_but_the_head(imagenet_like_weights):
    file = torch.load(imagenet_like_weights["resnet18"], weights_only=True)
    model = build_model("resnet18", 2, 32)
    head_before = model.fc.weight.clone()
    lineage = load_weights(model, "resnet18", open_weights("resnet18", imagenet_like_weights["resnet18"]))
    for key, value in model.state_dict().items():
        if key.startswith("fc."):
            assert value.shape[0] == 2 and file[key].shape[0] == 1000
        else:
            assert torch.equal(value, file[key]), key
    assert torch.equal(model.fc.weight, head_before), "the head keeps its fresh initialisation"
    assert lineage["weights_sha256"] == file_hash(imagenet_like_weights["resnet18"])


def test_weights_that_do_not_fit_name_the_first_tensor_that_differs(imagenet_like_weights, demo_data, tmp_path):
    file = torch.load(imagenet_like_weights["resnet18"], weights_only=True)
    file["layer2.0.conv1.weight"] = torch.zeros(128, 64, 1, 1)
    torch.save(file, tmp_path / "reshaped.pth")
    with pytest.raises(UserError, match=r"reshaped.pth: tensor layer2.0.conv1.weight has shape \[128, 64, 1, 1\] "
                                        r"in the file and \[128, 64, 3, 3\] in resnet18$"):
        load_weights(build_model("resnet18", 2, 32), "resnet18", open_weights("resnet18", tmp_path / "reshaped.pth"))
    with pytest.raises(UserError, match=r"mobilenet_v3_small.pth: has no tensor conv1.weight .* another architecture"):
        load_weights(build_model("resnet18", 2, 32), "resnet18",
                     open_weights("resnet18", imagenet_like_weights["mobilenet_v3_small"]))
    torch.save({"format": FORMAT, "state_dict": file}, tmp_path / "checkpoint.pt")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled.pth")
    result = run_main("train.py", "--data", demo_data, "--task", "target", "--model", "resnet18", "--weights",
                      tmp_path / "checkpoint.pt", "--out", tmp_path / "run", check=False)
    _one_line_error(result, "checkpoint.pt: a checkpoint of this toolkit, not a state_dict; start from it with "
                            "transfer.py --source")
    result = run_main("train.py", "--data", demo_data, "--task", "target", "--model", "resnet18", "--weights",
                      tmp_path / "pickled.pth", "--out", tmp_path / "run", check=False)
    _one_line_error(result, "pickled.pth: refused, it is not a plain state_dict")
    result = run_main("train.py", "--data", demo_data, "--task", "target", "--mean", "0.5", "0.5", "0.5",
                      "--out", tmp_path / "run", check=False)
    _one_line_error(result, "--mean and --std: give both")


def test_resume_refuses_another_weights_file(imagenet_like_weights, demo_data, tmp_path):
    other = torchvision.models.mobilenet_v3_small(weights=None, num_classes=10).state_dict()
    torch.save(other, tmp_path / "other.pth")
    common = ["--data", demo_data, "--task", "target", "--model", "mobilenet_v3_small", "--image-size", "32",
              "--batch-size", "40", "--epochs", "1", "--out", tmp_path / "run"]
    run_main("train.py", *common, "--weights", imagenet_like_weights["mobilenet_v3_small"])
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["lineage"]["weights_sha256"] == file_hash(imagenet_like_weights["mobilenet_v3_small"])
    _one_line_error(run_main("train.py", *common, "--weights", tmp_path / "other.pth", "--resume", check=False),
                    "--resume:", "different --weights (it had --weights ", "mobilenet_v3_small.pth)")
    _one_line_error(run_main("train.py", *common, "--resume", check=False), "different --weights")


def test_grad_cam_reads_channels_last_and_token_outputs_as_maps():
    nhwc = torch.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5)  # (N, H, W, C), as Swin's blocks give
    assert torch.equal(cam_reshape("swin_t")(nhwc)[1, 4, 2, 3], nhwc[1, 2, 3, 4])
    tokens = torch.arange(2 * 10 * 5.0).reshape(2, 10, 5)  # (N, class token + 3x3 patches, C), as ViT's
    assert torch.equal(cam_reshape("vit_b_32")(tokens)[1, 4, 2, 0], tokens[1, 1 + 2 * 3 + 0, 4])
    assert cam_reshape("mobilenet_v3_small") is None
    for name, size in (("swin_t", 32), ("vit_b_32", 64)):
        torch.manual_seed(0)
        # torchvision zeroes ViT's classifier at initialisation, which would leave no gradient to map.
        model = replace_head(build_model(name, 2, size), name, 2).eval()
        images = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
        maps = cam.compute_heatmaps(model, images, [0.5] * 3, [0.25] * 3, torch.device("cpu"), "layercam",
                                    [default_cam_layer(name)], torch.tensor([0, 1]), reshape=cam_reshape(name))
        assert maps.shape == (2, size, size) and maps.min() >= 0 and maps.max() == pytest.approx(1), name


def test_freezing_vit_s_first_stage_freezes_its_bare_parameters():
    with meta_device():
        model = build_model("vit_b_32", 2, 64)
    frozen = freeze_stages(model, "vit_b_32", 1)
    assert not model.class_token.requires_grad and not model.encoder.pos_embedding.requires_grad
    assert not model.conv_proj.weight.requires_grad and frozen == [model.conv_proj]
    assert model.encoder.layers[0].ln_1.weight.requires_grad


def test_short_runs_get_batchnorm_momentum_and_heads_that_suit_them():
    """torchvision's MobileNetV3 and MNASNet BatchNorm momenta (0.01, 0.0003) and EfficientNet's and
    MNASNet's head scale 1/sqrt(classes) suit ImageNet runs, not a few hundred steps on 2 classes."""
    for name in ("mobilenet_v3_small", "mnasnet0_5", "efficientnet_b0"):
        model = build_model(name, 2, 32)
        momenta = {m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
        head = model.get_submodule(head_name(name))
        assert momenta == {0.1} and head.weight.std() <= 1 / head.in_features ** 0.5, name


def test_stem_is_recorded_and_old_checkpoints_rebuild_as_they_were():
    assert resolve_stem("resnet18", 64) == "no-maxpool" and resolve_stem("resnet18", 224) == "stock"
    assert resolve_stem("fastnet", 64) == "standard"
    torch.manual_seed(0)
    stock = build_model("resnet18", 2, 64, "stock")
    base = {"format": FORMAT, "model": "resnet18", "classes": ["a", "b"], "image_size": 64, "mean": [0.5] * 3,
            "std": [0.25] * 3, "state_dict": stock.state_dict()}
    legacy = build_from_checkpoint(base)  # written before checkpoints named their stem
    assert isinstance(legacy.maxpool, torch.nn.Identity)
    rebuilt = build_from_checkpoint({**base, "stem": "stock"})
    assert isinstance(rebuilt.maxpool, torch.nn.MaxPool2d)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), stock.eval()(x))
        assert not torch.allclose(legacy(x), rebuilt(x)), "same weights, other stem: another network"
