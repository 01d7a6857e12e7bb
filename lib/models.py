"""The model registry, what a "stage" is per model, each model's stem, and its default Grad-CAM layer.

fastnet (the default) is a compact network for small photos (see FastNet).

ResNets on small photos: torchvision's ResNets shrink the input 4x before layer1 (a stride-2
7x7 conv, then a stride-2 max-pool), which leaves a 64x64 photo only 2x2 at layer4. For inputs
under 128 pixels we drop the max-pool by default (the "no-maxpool" stem), so layer1 works at
32x32 and layer4 at 4x4; the "stock" stem keeps it, at a quarter of the FLOPs. Everything else
is torchvision's model, trained from scratch (no downloaded weights).
"""
import torch
import torch.nn as nn
import torchvision

from lib.errors import UserError

SMALL_INPUT = 128
CNN3_MIN_SIZE = 11  # the smallest input whose feature map after conv3 is not empty


class CNN3(nn.Module):
    """The reference work's small CNN: three 5x5 stride-2 convolutions (3->16->64->8), ReLU,
    2x2 max-pooling after the first two, and one linear layer."""

    def __init__(self, num_classes, image_size=64):
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


def _resnet(builder):
    def build(num_classes, image_size, stem):
        model = builder(weights=None, num_classes=num_classes)
        if stem == "no-maxpool":
            model.maxpool = nn.Identity()
        return model
    return build


def _plain(builder):
    """A model with one stem (nothing to choose)."""
    return lambda num_classes, image_size, stem: builder(num_classes, image_size)


MODELS = {
    "cnn3": _plain(CNN3),
    "fastnet": _plain(lambda num_classes, image_size: FastNet(num_classes)),
    "resnet18": _resnet(torchvision.models.resnet18),
    "resnet34": _resnet(torchvision.models.resnet34),
    "resnet50": _resnet(torchvision.models.resnet50),
}

DEFAULT_MODEL = "fastnet"

# Freezable stages in input-to-output order; the head (classifier) is never a stage.
STAGES = {
    "cnn3": [["conv1"], ["conv2"], ["conv3"]],
    "fastnet": [["conv1"], ["layer1"], ["layer2"], ["layer3"]],
    "resnet": [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]],
}
HEAD = "fc"

# layer4 of a ResNet is 4x4 on a 64x64 photo: too coarse for a useful map. layer3 (8x8)
# keeps enough resolution while still seeing whole building parts.
# fastnet: layer2 (8x8), the same resolution. cnn3: conv2 after its ReLU (8x8); CAM methods
# assume non-negative activations.
CAM_LAYER = {"cnn3": "relu2", "resnet": "layer3", "fastnet": "layer2"}


def _family(name):
    return "resnet" if name.startswith("resnet") else name


# A stem variant changes the network but not its weights (a max-pool has none), so a checkpoint
# records its stem: loaded into the other variant it would run, silently wrong.
STEMS = {"resnet": ("no-maxpool", "stock")}
SINGLE_STEM = "standard"


def stems_of(name):
    return STEMS.get(_family(name), (SINGLE_STEM,))


def resolve_stem(name, image_size, stem=None):
    """The stem a model is built with. None or "auto": ResNets drop the max-pool under 128 px
    (the rule every checkpoint without a "stem" entry was built by); other models have one stem."""
    family = _family(name)
    choices = stems_of(name)
    if stem in (None, "auto"):
        return ("no-maxpool" if image_size < SMALL_INPUT else "stock") if family == "resnet" else SINGLE_STEM
    if stem not in choices:
        raise UserError(f"--stem {stem}: {name} has the stem(s) {', '.join(choices)}")
    return stem


def build_model(name, num_classes, image_size=64, stem=None):
    if name not in MODELS:
        raise UserError(f"--model {name}: unknown model; choose from {', '.join(MODELS)}")
    return MODELS[name](num_classes, image_size, resolve_stem(name, image_size, stem))


def fixed_input_size(name):
    """cnn3's linear layer reads its feature map flattened, so it takes one input size only
    (no progressive resizing); the others pool globally and take any size."""
    return _family(name) == "cnn3"


def stage_count(name):
    return len(STAGES[_family(name)])


def stages(model, name):
    """The model's freezable stages, each a list of its submodules, input side first."""
    return [[getattr(model, part) for part in stage] for stage in STAGES[_family(name)]]


def replace_head(model, num_classes):
    """A fresh classifier for another task, keeping everything before it."""
    old = getattr(model, HEAD)
    setattr(model, HEAD, nn.Linear(old.in_features, num_classes))
    return model


def default_cam_layer(name):
    return CAM_LAYER[_family(name)]
