from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from fga_search import FGAConv2d, build_model, decomposable_layers, decompose

TORCHVISION = [
    "resnet18",
    "resnet50",
    "vgg16_bn",
    "mobilenet_v2",
    "densenet121",
    "regnet_x_400mf",
    "efficientnet_b0",
    "convnext_tiny",
]
CIFAR = ["resnet20", "resnet56", "vgg16_cifar", "digits_cnn"]


def full_rank_plan(model: nn.Module) -> dict:
    """Every standard conv at full rank, with the second-smallest valid group count (1 if none)."""
    plan = {}
    for info in decomposable_layers(model):
        if info.depthwise:
            continue
        g = info.valid_groups[1] if len(info.valid_groups) > 1 else 1
        plan[info.name] = (g, info.exact_rank(g))
    return plan


def check_exact(model: nn.Module, shape: tuple[int, ...]) -> None:
    model = model.double().eval()
    plan = full_rank_plan(model)
    assert plan
    new = decompose(model, plan).eval()
    assert sum(isinstance(m, FGAConv2d) for m in new.modules()) == len(plan)
    x = torch.randn(2, *shape, dtype=torch.float64)
    with torch.no_grad():
        expected, got = model(x), new(x)
    rel = float((got - expected).norm() / expected.norm())
    assert rel < 1e-5, rel


@pytest.mark.slow
@pytest.mark.parametrize("name", TORCHVISION)
def test_full_rank_exact_on_torchvision(name: str) -> None:
    model = torchvision.models.get_model(name, weights=None, num_classes=10)
    check_exact(model, (3, 64, 64))


@pytest.mark.parametrize("name", CIFAR)
def test_full_rank_exact_on_cifar_models(name: str) -> None:
    model = build_model(name, num_classes=10)
    check_exact(model, (1, 8, 8) if name == "digits_cnn" else (3, 32, 32))


def test_odd_geometries_in_one_model() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=True),
        nn.Conv2d(16, 16, 3, dilation=2, padding=2, padding_mode="reflect"),
        nn.Conv2d(16, 24, (1, 7), padding=(0, 3)),
        nn.Conv2d(24, 24, (7, 1), padding="same", groups=2),
        nn.Conv2d(24, 24, 3, padding=1, groups=24),  # depthwise: kept
    )
    check_exact(model, (3, 20, 20))


def test_unknown_and_non_conv_layers_list_valid_names() -> None:
    model = build_model("resnet20", num_classes=10)
    with pytest.raises(
        ValueError,
        match=r"unknown layer 'layer9.conv'; decomposable Conv2d layers are: conv1, layer1.0.conv1",
    ):
        decompose(model, {"layer9.conv": (1, 1)})
    with pytest.raises(
        ValueError, match=r"plan names layer 'layer1.0.bn1', which is a BatchNorm2d, not a Conv2d"
    ):
        decompose(model, {"layer1.0.bn1": (1, 1)})


def test_source_model_is_never_modified() -> None:
    model = build_model("resnet20", num_classes=10)
    before = copy.deepcopy(model.state_dict())
    modules_before = [type(m) for m in model.modules()]
    calib = torch.randn(16, 3, 32, 32)
    new = decompose(model, {"layer1.0.conv1": (2, 3), "layer3.2.conv2": (4, 5)}, calib)
    assert [type(m) for m in model.modules()] == modules_before
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert isinstance(new.get_submodule("layer1.0.conv1"), FGAConv2d)
    assert not isinstance(model.get_submodule("layer1.0.conv1"), FGAConv2d)
