"""Every model the toolkit trains, as one record per family (`Architecture`), looked up by name.

A record says what the rest of the toolkit needs to know about a network, after timm's model
contract (a config naming the classifier, `reset_classifier`, parameter groups for freezing):
- how to build it untrained (torchvision builders with weights=None: nothing is ever downloaded);
- its freezable stages, input side first (lib.transfer freezes the first K);
- its head, the classifier layer that another task's classes replace (`replace_head`);
- its default Grad-CAM layer: a layer that still has spatial resolution but sees parts of
  buildings; for 64-128 px photos that is usually the last block at 1/16 of the input, as the
  1/32 one is 2x2 to 4x4;
- its stem variants and whether it takes one input size only.

Two ways to give stages: by name, or as a `trunk` (a Sequential of blocks, e.g. MobileNet's
`features`) whose first `stem_blocks` are the stem and whose other blocks are grouped by the
resolution they output (one stage per downsampling). The resolutions are read off a forward pass
at 224 px on the meta device (shapes only, no memory or arithmetic). Layers outside the trunk
that come before the head (`tail`, e.g. MobileNetV3's first classifier Linear) join the last stage.

fastnet (the default) and cnn3 are this project's own (see FastNet, CNN3). ResNets on small
photos: torchvision's ResNets shrink the input 4x before layer1 (a stride-2 7x7 conv, then a
stride-2 max-pool), which leaves a 64x64 photo only 2x2 at layer4; for inputs under 128 px the
max-pool is dropped by default (the "no-maxpool" stem), the "stock" stem keeps it.
"""
import contextlib
import functools
import math
import textwrap
from dataclasses import dataclass
from typing import Callable
from unittest import mock

import torch
import torch.nn as nn
import torchvision

from lib.errors import UserError
from lib.preprocessing import DEFAULT_IMAGE_SIZE

SMALL_INPUT = 128
CNN3_MIN_SIZE = 11  # the smallest input whose feature map after conv3 is not empty
SINGLE_STEM = "standard"
REFERENCE_SIZE = 224  # the size at which a trunk's resolutions are read (every torchvision model runs at it)
CAM_DOWNSAMPLING = 16
BATCHNORM_MOMENTUM = 0.1  # PyTorch's default; see build_model


class CNN3(nn.Module):
    """The reference work's small CNN: three 5x5 stride-2 convolutions (3->16->64->8), ReLU,
    2x2 max-pooling after the first two, and one linear layer."""

    def __init__(self, num_classes, image_size=DEFAULT_IMAGE_SIZE):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 5, stride=2, padding=2)
        self.conv2 = nn.Conv2d(16, 64, 5, stride=2, padding=2)
        self.conv3 = nn.Conv2d(64, 8, 5, stride=2, padding=2)
        # One ReLU per layer (no weights, so checkpoints are unaffected): Grad-CAM hooks the
        # rectified maps of conv2 by name, and a shared module would fire three times.
        self.relu1, self.relu2, self.relu3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        side = self.feature_side(image_size)
        if side < 1:
            raise UserError(f"--image-size {image_size}: too small for cnn3 (its feature map would be empty; "
                            f"use {CNN3_MIN_SIZE} or more)")
        self.fc = nn.Linear(8 * side * side, num_classes)

    @staticmethod
    def feature_side(image_size):
        """Side of conv3's output: each 5x5 stride-2 conv (padding 2) rounds up, each pool down."""
        side = image_size
        for pooled in (True, True, False):
            side = (side + 1) // 2
            if pooled:
                side //= 2
        return side

    def forward(self, x):
        x = self.pool(self.relu1(self.conv1(x)))
        x = self.pool(self.relu2(self.conv2(x)))
        x = self.relu3(self.conv3(x))
        return self.fc(x.flatten(1))


def _conv_bn_relu(inputs, outputs, stride=1):
    return [nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU(inplace=True)]


class FastNet(nn.Module):
    """A compact network in the style of the CIFAR-10 speed records (Page's ResNet-9, Jordan's
    airbench): few, wide 3x3 convolutions at low resolution, which is where CPUs compute fastest.

    A stride-2 stem (3->32, so a 64x64 photo is worked on at 32x32), then three blocks of
    conv -> 2x2 max-pool -> BatchNorm -> ReLU -> conv -> BatchNorm -> ReLU at widths 64, 128 and
    256, a global max-pool and one linear layer: 1.2M parameters and 0.17 GFLOP per 64x64
    image, against ResNet-18's 11.2M and 1.13 GFLOP without its max-pool (0.30 with it).
    Any input of 16 px or more works (progressive resizing trains on smaller ones).
    """

    def __init__(self, num_classes, widths=(64, 128, 256), stem=32):
        super().__init__()
        self.conv1 = nn.Sequential(*_conv_bn_relu(3, stem, 2))
        blocks, inputs = [], stem
        for width in widths:
            blocks.append(nn.Sequential(nn.Conv2d(inputs, width, 3, 1, 1, bias=False), nn.MaxPool2d(2),
                                        nn.BatchNorm2d(width), nn.ReLU(inplace=True), *_conv_bn_relu(width, width)))
            inputs = width
        self.layer1, self.layer2, self.layer3 = blocks
        self.fc = nn.Linear(inputs, num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.fc(torch.amax(x, dim=(2, 3)))


# Builders: (name, num_classes, image_size, stem) -> an untrained model.

def _torchvision(name, num_classes, image_size, stem, **options):
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **options)


def _resnet(name, num_classes, image_size, stem):
    model = _torchvision(name, num_classes, image_size, stem)
    if stem == "no-maxpool":
        model.maxpool = nn.Identity()
    return model


def _without_aux_heads(name, num_classes, image_size, stem):
    # The auxiliary classifiers are a training-time regulariser of the 2014-15 ImageNet recipes
    # whose outputs the one training loop has no loss for; torchvision's eval-mode model ignores them.
    return _torchvision(name, num_classes, image_size, stem, aux_logits=False, init_weights=True)


def _sized(option):
    """A builder for a model whose layers are sized for one input (ViT's position embedding,
    MaxViT's attention windows): built for --image-size."""
    def build(name, num_classes, image_size, stem):
        size = (image_size, image_size) if option == "input_size" else image_size
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **{option: size})
    return build


@dataclass(frozen=True)
class Architecture:
    """One family of architectures; see the module docstring for what each part is for."""
    names: tuple               # the --model names it covers
    build: Callable            # (name, num_classes, image_size, stem) -> untrained nn.Module
    head: str                  # dotted path of the classifier layer (a Linear, or SqueezeNet's 1x1 Conv2d)
    help: str                  # stages and Grad-CAM layer in words, for --help
    stages: tuple = ()         # stages by name: tuples of submodule or parameter names
    trunk: str = ""            # ... or a Sequential of blocks: the stem, then one stage per resolution
    stem_blocks: object = 1    # with a trunk: the stem is its first N blocks, or these names outside it
    per_block: bool = False    # a trunk of one resolution (ViT): each block is a stage
    tail: tuple = ()           # layers between the last stage and the head; they join the last stage
    cam_layer: str = ""        # default Grad-CAM layer; "" with a trunk: its last block at 1/16.
    #                            "{last}" stands for the trunk's last block.
    cam_layout: str = "NCHW"   # the Grad-CAM layer's output: NCHW, NHWC (Swin) or tokens (ViT, class token first)
    stems: tuple = (SINGLE_STEM,)
    fixed_size: bool = False   # takes one input size only (no progressive resizing)
    size_multiple: int = 1     # --image-size must be a multiple of this ...
    size_reason: str = ""      # ... because of this
    aux_heads: tuple = ()      # state_dict prefixes of auxiliary heads the model is built without
    fresh_head: bool = False   # replace torchvision's head initialisation by nn.Linear's (see build_model)


def _names(prefix):
    """The torchvision classification models whose names start with `prefix`."""
    return tuple(n for n in torchvision.models.list_models(module=torchvision.models) if n.startswith(prefix))


_CONV_BLOCKS = "the stem ({stem}), then {trunk}' blocks grouped by resolution (one stage per downsampling)"

FAMILIES = (
    Architecture(("fastnet",), lambda name, n, size, stem: FastNet(n), head="fc",
                 stages=(("conv1",), ("layer1",), ("layer2",), ("layer3",)), cam_layer="layer2",
                 help="conv1 (stem), layer1, layer2, layer3; Grad-CAM layer2 (1/8)"),
    Architecture(("cnn3",), lambda name, n, size, stem: CNN3(n, size), head="fc",
                 stages=(("conv1",), ("conv2",), ("conv3",)), cam_layer="relu2", fixed_size=True,
                 help="conv1, conv2, conv3; Grad-CAM relu2 (1/8); one input size (its linear layer reads "
                      "the feature map flattened)"),
    Architecture(_names("resnet") + _names("resnext") + _names("wide_resnet"), _resnet, head="fc",
                 stages=(("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",)),
                 cam_layer="layer3", stems=("no-maxpool", "stock"),
                 help="conv1+bn1 (stem), layer1..layer4; Grad-CAM layer3; --stem no-maxpool|stock"),
    Architecture(_names("regnet"), _torchvision, head="fc",
                 stages=(("stem",),) + tuple((f"trunk_output.block{i}",) for i in range(1, 5)),
                 cam_layer="trunk_output.block3", help="stem, trunk_output.block1..block4; Grad-CAM block3 (1/16)"),
    Architecture(_names("shufflenet_v2"), _torchvision, head="fc",
                 stages=(("conv1",), ("stage2",), ("stage3",), ("stage4", "conv5")), cam_layer="stage3",
                 help="conv1 (stem), stage2, stage3, stage4+conv5; Grad-CAM stage3 (1/16)"),
    Architecture(_names("mobilenet_v2"), _torchvision, head="classifier.1", trunk="features",
                 help=_CONV_BLOCKS.format(stem="features.0", trunk="features") + "; Grad-CAM: the last block at 1/16"),
    Architecture(_names("efficientnet"), _torchvision, head="classifier.1", trunk="features", fresh_head=True,
                 help=_CONV_BLOCKS.format(stem="features.0", trunk="features") + "; Grad-CAM: the last block at 1/16"),
    Architecture(_names("mobilenet_v3"), _torchvision, head="classifier.3", trunk="features", tail=("classifier.0",),
                 help=_CONV_BLOCKS.format(stem="features.0", trunk="features")
                 + ", classifier.0 (Linear) with the last; Grad-CAM: the last block at 1/16"),
    Architecture(_names("mnasnet"), _torchvision, head="classifier.1", trunk="layers", stem_blocks=8, fresh_head=True,
                 help=_CONV_BLOCKS.format(stem="layers.0-7", trunk="layers") + "; Grad-CAM: the last block at 1/16"),
    Architecture(_names("convnext"), _torchvision, head="classifier.2", trunk="features", tail=("classifier.0",),
                 help=_CONV_BLOCKS.format(stem="features.0", trunk="features")
                 + ", classifier.0 (LayerNorm) with the last; Grad-CAM: the last block at 1/16"),
    Architecture(_names("densenet"), _torchvision, head="classifier", trunk="features", stem_blocks=4,
                 help=_CONV_BLOCKS.format(stem="conv0, norm0, relu0, pool0", trunk="features")
                 + "; Grad-CAM: the last block at 1/16"),
    Architecture(_names("vgg"), _torchvision, head="classifier.6", trunk="features", stem_blocks=0,
                 tail=("classifier.0", "classifier.3"),
                 help="features' layers grouped by resolution (each max-pool starts a stage), classifier.0 and .3 "
                      "(Linear) with the last; Grad-CAM: the last layer at 1/16"),
    Architecture(_names("alexnet"), _torchvision, head="classifier.6", trunk="features", stem_blocks=0,
                 tail=("classifier.1", "classifier.4"),
                 help="features' layers grouped by resolution (each max-pool starts a stage), classifier.1 and .4 "
                      "(Linear) with the last; Grad-CAM: the last layer at 1/16; 63 px or more"),
    Architecture(_names("squeezenet"), _torchvision, head="classifier.1", trunk="features", stem_blocks=0,
                 help="features' layers grouped by resolution (each max-pool starts a stage); the head is a 1x1 "
                      "convolution; Grad-CAM: the last layer at 1/16"),
    Architecture(_names("googlenet"), _without_aux_heads, head="fc", aux_heads=("aux1.", "aux2."),
                 stages=(("conv1",), ("conv2", "conv3"), ("inception3a", "inception3b"),
                         tuple(f"inception4{c}" for c in "abcde"), ("inception5a", "inception5b")),
                 cam_layer="inception4e",
                 help="conv1 (stem), conv2+conv3, inception3*, inception4*, inception5*; Grad-CAM inception4e "
                      "(1/16); built without the auxiliary heads"),
    Architecture(_names("inception_v3"), _without_aux_heads, head="fc", aux_heads=("AuxLogits.",),
                 stages=(("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"), ("Conv2d_3b_1x1", "Conv2d_4a_3x3"),
                         ("Mixed_5b", "Mixed_5c", "Mixed_5d"), tuple(f"Mixed_6{c}" for c in "abcde"),
                         ("Mixed_7a", "Mixed_7b", "Mixed_7c")),
                 cam_layer="Mixed_6e",
                 help="Conv2d_1a-2b (stem), Conv2d_3b+4a, Mixed_5*, Mixed_6*, Mixed_7*; Grad-CAM Mixed_6e; "
                      "built without the auxiliary head; 75 px or more"),
    Architecture(_names("swin"), _torchvision, head="head", trunk="features", tail=("norm",), cam_layout="NHWC",
                 help=_CONV_BLOCKS.format(stem="features.0, the patch embedding", trunk="features")
                 + ", norm with the last; Grad-CAM: the last block at 1/16"),
    Architecture(_names("vit"), _sized("image_size"), head="heads.head", trunk="encoder.layers",
                 stem_blocks=("conv_proj", "class_token", "encoder.pos_embedding"), per_block=True, tail=("encoder.ln",),
                 cam_layer="{last}.ln_1", cam_layout="tokens", fixed_size=True,
                 help="the patch embedding (conv_proj, class token, position embedding), then each encoder block; "
                      "Grad-CAM: the last block's ln_1; built for --image-size, a multiple of its patch size"),
    Architecture(_names("maxvit"), _sized("input_size"), head="classifier.5",
                 stages=(("stem",),) + tuple((f"blocks.{i}",) for i in range(4)),
                 tail=("classifier.2", "classifier.3"), cam_layer="blocks.2", fixed_size=True, size_multiple=224,
                 size_reason="its 7x7 attention windows must tile every stage",
                 help="stem, blocks.0..3; Grad-CAM blocks.2 (1/16); built for --image-size, a multiple of 224"),
)

MODELS = {name: family for family in FAMILIES for name in family.names}
DEFAULT_MODEL = "fastnet"

# A stem variant changes the network but not its weights (a max-pool has none), so a checkpoint
# records its stem: loaded into the other variant it would run, silently wrong.
STEMS = tuple(dict.fromkeys(stem for family in FAMILIES for stem in family.stems if stem != SINGLE_STEM))


def architecture(name):
    """The record of --model `name`; an unknown name is a UserError."""
    if name not in MODELS:
        raise UserError(f"--model {name}: unknown model; choose fastnet, cnn3 or a torchvision classification "
                        "model (train.py --help lists them)")
    return MODELS[name]


def _size_multiple(name):
    """ViT's patch size is the number its name ends with (vit_b_16: 16 px patches)."""
    family = architecture(name)
    if family.cam_layout == "tokens":
        return int(name.rsplit("_", 1)[1]), "it cuts images into square patches of that side"
    return family.size_multiple, family.size_reason


def stems_of(name):
    return architecture(name).stems


def resolve_stem(name, image_size, stem=None):
    """The stem a model is built with. None or "auto": ResNets drop the max-pool under 128 px
    (the rule every checkpoint without a "stem" entry was built by); other models have one stem."""
    choices = stems_of(name)
    if stem in (None, "auto"):
        if "no-maxpool" in choices:
            return "no-maxpool" if image_size < SMALL_INPUT else "stock"
        return choices[0]
    if stem not in choices:
        raise UserError(f"--stem {stem}: {name} has the stem(s) {', '.join(choices)}")
    return stem


def build_model(name, num_classes, image_size=DEFAULT_IMAGE_SIZE, stem=None):
    """An untrained `name` for `num_classes` classes and `image_size` px inputs; UserError for an
    unknown name, stem, or an image size the architecture cannot be built for.

    Every BatchNorm layer gets PyTorch's default momentum, 0.1. torchvision's MobileNetV3 and
    MaxViT (0.01) and MNASNet (0.0003) keep TensorFlow's values, chosen for ImageNet runs of
    hundreds of thousands of steps; in a run of a few hundred their running statistics stay
    mostly at their initial values and the eval-mode model is nearly constant (measured:
    MobileNetV3-Small, 10 epochs on the 420 landmark target images, training accuracy 0.82:
    validation accuracy 0.50 at loss 0.693 with 0.01, 0.84 at loss 0.48 with 0.1). Momentum is
    not a weight: checkpoints are unaffected.

    EfficientNet and MNASNet get a fresh head (PyTorch's nn.Linear initialisation, as
    replace_head gives): torchvision scales theirs by 1/sqrt(num_classes), right for ImageNet's
    1000 classes but 25-44x nn.Linear's spread for 2 classes, whose huge first logits kept
    EfficientNet-B0 at chance (10 epochs on the 420 target images: training loss 4.2 to 1.4,
    validation accuracy 0.50).
    """
    family = architecture(name)
    multiple, reason = _size_multiple(name)
    if image_size % multiple:
        raise UserError(f"--image-size {image_size}: {name} needs a multiple of {multiple} px ({reason})")
    model = family.build(name, num_classes, image_size, resolve_stem(name, image_size, stem))
    if family.fresh_head:
        replace_head(model, name, num_classes)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = BATCHNORM_MOMENTUM
    return model


def fixed_input_size(name):
    """Whether the model takes one input size only (no progressive resizing): cnn3's linear layer
    reads its feature map flattened, ViT's position embedding and MaxViT's windows are sized.
    A name this project does not build (none given) takes any size."""
    return name in MODELS and MODELS[name].fixed_size


@contextlib.contextmanager
def meta_device():
    """Build models on the meta device: shapes without memory or initialisation, so that any
    model, however large, can be analysed (stages, FLOPs) in about a second. RegNet's
    builder computes its stage widths with tensors and reads them back (.tolist()), which meta
    tensors cannot; that arithmetic runs on the CPU."""
    from torchvision.models.regnet import BlockParams
    widths = BlockParams.from_init_params

    def widths_on_cpu(*args, **kwargs):
        with torch.device("cpu"):
            return widths(*args, **kwargs)
    with mock.patch.object(BlockParams, "from_init_params", widths_on_cpu), torch.device("meta"):
        yield


def reference_model(name):
    """`name` for 2 classes at the reference size (224 px) on the meta device, built once and
    shared: for reading its structure, never for training (copy it to change it)."""
    return _reference(name)[0]


@functools.cache
def _reference(name):
    """reference_model(name), and {trunk block name: the spatial side it outputs there}."""
    family = architecture(name)
    with meta_device():
        model = build_model(name, 2, REFERENCE_SIZE)
    sides = {}
    if family.trunk and not family.per_block:
        axis = 1 if family.cam_layout == "NHWC" else 2

        def recorder(key):
            def hook(module, inputs, output):
                sides[key] = output.shape[axis]
            return hook
        hooks = [block.register_forward_hook(recorder(key))
                 for key, block in model.get_submodule(family.trunk).named_children()]
        with torch.no_grad():
            model.eval()(torch.empty(1, 3, REFERENCE_SIZE, REFERENCE_SIZE, device="meta"))
        for hook in hooks:
            hook.remove()
    return model, sides


def _level(side):
    """How many times a block's output has been halved from the reference input (rounded)."""
    return round(math.log2(REFERENCE_SIZE / side))


def stage_names(name):
    """The freezable stages of `name`, input side first, each a list of dotted names of submodules
    or parameters (every parameter of the model is in one stage or in the head)."""
    family = architecture(name)
    if not family.trunk:
        stages = [list(stage) for stage in family.stages]
    else:
        model, sides = _reference(name)
        blocks = [key for key, _ in model.get_submodule(family.trunk).named_children()]
        if isinstance(family.stem_blocks, tuple):  # the stem lies outside the trunk
            stages, rest = [list(family.stem_blocks)], blocks
        else:
            stem = [f"{family.trunk}.{key}" for key in blocks[:family.stem_blocks]]
            stages, rest = ([stem] if stem else []), blocks[family.stem_blocks:]
        levels = []  # the resolution level each stage outputs
        for index, key in enumerate(rest):
            level = index if family.per_block else _level(sides[key])
            if levels and levels[-1] == level:
                stages[-1].append(f"{family.trunk}.{key}")
            else:
                levels.append(level)
                stages.append([f"{family.trunk}.{key}"])
    stages[-1].extend(family.tail)
    return stages


def stage_count(name):
    return len(stage_names(name))


def stages(model, name):
    """The model's freezable stages, input side first, each a list of its submodules and parameters."""
    def part(dotted):
        try:
            return model.get_submodule(dotted)
        except AttributeError:
            return model.get_parameter(dotted)
    return [[part(dotted) for dotted in stage] for stage in stage_names(name)]


def head_name(name):
    return architecture(name).head


def replace_head(model, name, num_classes):
    """A fresh classifier for another task's classes, keeping everything before it (timm's reset_classifier)
    and whether the old one had a bias (MaxViT's has none): the rebuilt network's state_dict must
    hold the same tensors."""
    path = head_name(name)
    old = model.get_submodule(path)
    bias = old.bias is not None
    if isinstance(old, nn.Conv2d):
        new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, bias=bias)
    else:
        new = nn.Linear(old.in_features, num_classes, bias=bias)
    model.set_submodule(path, new.to(old.weight.device))
    return model


def default_cam_layer(name):
    """The Grad-CAM layer explain.py uses unless --layer is given."""
    family = architecture(name)
    if family.cam_layer and "{last}" not in family.cam_layer:
        return family.cam_layer
    model, sides = _reference(name)
    trunk = model.get_submodule(family.trunk)
    keys = [key for key, _ in trunk.named_children()]
    if family.cam_layer:
        return family.cam_layer.format(last=f"{family.trunk}.{keys[-1]}")
    target = round(math.log2(CAM_DOWNSAMPLING))
    chosen = [key for key in keys if _level(sides[key]) <= target][-1]
    return f"{family.trunk}.{chosen}"


def cam_reshape(name):
    """pytorch-grad-cam's reshape_transform for the model's Grad-CAM layer: its output as
    (N, C, H, W), or None when it already is."""
    layout = architecture(name).cam_layout
    if layout == "NHWC":
        return lambda x: x.permute(0, 3, 1, 2)
    if layout == "tokens":
        def tokens_to_map(x):
            patches = x[:, 1:]  # the class token first, then the patches row by row
            side = math.isqrt(patches.shape[1])
            return patches.reshape(x.shape[0], side, side, x.shape[2]).permute(0, 3, 1, 2)
        return tokens_to_map
    return None


def describe_models():
    """Every model with its stages and Grad-CAM layer, for --help."""
    lines = ["models (--model NAME), their freezable stages (--freeze K freezes the first K) and Grad-CAM layer:"]
    for family in FAMILIES:
        lines.append(textwrap.fill(", ".join(family.names), width=100, initial_indent="  ", subsequent_indent="  "))
        lines.append(textwrap.fill(family.help, width=100, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


class Ensemble(nn.Module):
    """Several networks for the same classes whose class probabilities are averaged (a seed
    ensemble: Lakshminarayanan et al., "Simple and Scalable Predictive Uncertainty Estimation
    using Deep Ensembles", 2017, average the members' probabilities).

    forward: (N, 3, H, W) -> (N, C) log of the mean of the members' softmax probabilities,
    log((1/M) sum_m softmax(f_m(x))). That is a normalised log-probability vector, so
    softmax(output) is exactly the averaged probabilities (up to float rounding): every caller
    that treats the output as logits (lib.engine.predict_probs, the export wrapper's softmax,
    Grad-CAM's class log-odds) sees the ensemble's probabilities without knowing it is one.
    Averaging the logits instead would be another model, the normalised geometric mean of the
    members' probabilities, which lets one over-confident member outvote the others.
    """

    def __init__(self, members):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x):
        log_probs = torch.stack([torch.log_softmax(member(x), dim=1) for member in self.members])
        return torch.logsumexp(log_probs, dim=0) - math.log(len(self.members))
