from __future__ import annotations

import random

import pytest
import torchvision
from torch import nn

from fga_search import KEEP, ModelProfile, build_model, count_flops, decomposable_layers


def random_plan(model: nn.Module, rng: random.Random) -> dict:
    plan = {}
    for info in decomposable_layers(model):
        if info.depthwise or rng.random() < 0.2:
            plan[info.name] = KEEP
            continue
        g = rng.choice(info.valid_groups)
        plan[info.name] = (g, rng.randint(1, info.exact_rank(g)))
    return plan


MODELS = {
    "resnet56": (lambda: build_model("resnet56", num_classes=10), (3, 32, 32)),
    "vgg16_cifar": (lambda: build_model("vgg16_cifar", num_classes=10), (3, 32, 32)),
    "digits_cnn": (lambda: build_model("digits_cnn", num_classes=10), (1, 8, 8)),
    "resnet50": (lambda: torchvision.models.resnet50(num_classes=10), (3, 64, 64)),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), (3, 64, 64)),
    "regnet_x_400mf": (lambda: torchvision.models.regnet_x_400mf(num_classes=10), (3, 64, 64)),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(num_classes=10), (3, 64, 64)),
}


@pytest.mark.parametrize("name", MODELS)
def test_analytic_equals_flop_counter(name: str) -> None:
    factory, shape = MODELS[name]
    model = factory()
    profile = ModelProfile(model, input_shape=shape)
    assert profile.other_macs == 0  # plain CNNs: every counted op is a conv or a linear
    base = profile.count({})
    measured = count_flops(model, input_shape=shape, method="measured")
    assert base.macs == measured.macs and base.params == measured.params
    assert base.flops == 2 * base.macs
    rng = random.Random(name)
    for _ in range(3):
        plan = random_plan(model, rng)
        analytic = profile.count(plan)
        measured = count_flops(model, input_shape=shape, plan=plan, method="measured")
        assert analytic.macs == measured.macs
        assert analytic.params == measured.params


def test_shared_model_counts() -> None:
    resnet = build_model("resnet56", num_classes=10)
    vgg = build_model("vgg16_cifar", num_classes=10)
    assert count_flops(resnet, input_shape=(3, 32, 32)).macs == 125_485_696
    assert count_flops(vgg, input_shape=(3, 32, 32)).macs == 313_201_664
    assert count_flops(resnet, input_shape=(3, 32, 32)).params == 853_018


def test_per_layer_costs_and_ratio() -> None:
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    profile = ModelProfile(model, input_shape=(4, 6, 6))
    dense = profile.count({})
    assert dense.layers["0"].macs == 36 * 8 * 4 * 9
    assert profile.linear_macs == 8 * 36 * 5
    cost = profile.count({"0": (2, 3)})
    assert cost.layers["0"].macs == 36 * (3 * 4 * 9 + 8 * 2 * 3)
    assert cost.layers["0"].params == 3 * 4 * 9 + 8 * 2 * 3 + 8
    assert profile.ratio({"0": (2, 3)}) == pytest.approx(cost.macs / dense.macs)
    with pytest.raises(ValueError, match="metric must be 'flops' or 'params'"):
        profile.ratio({}, metric="latency")


def test_bad_input_shape() -> None:
    with pytest.raises(ValueError, match="input_shape must be"):
        count_flops(nn.Conv2d(1, 1, 1), input_shape=(1, 8))
