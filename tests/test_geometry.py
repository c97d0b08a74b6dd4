from __future__ import annotations

import torchvision
from torch import nn

from fga_search import decomposable_layers, decompose


def test_lists_every_conv_with_geometry_and_valid_groups() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 12, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False),
        nn.Conv2d(12, 18, 1, groups=3),
    )
    layers = decomposable_layers(model)
    assert [info.name for info in layers] == ["0", "2", "3"]
    first, depthwise, grouped = layers
    assert first.stride == (2, 2) and first.padding == (1, 1) and first.bias
    assert first.valid_groups == (1, 3)
    assert depthwise.depthwise and depthwise.valid_groups == (1,)
    assert grouped.base_groups == 3 and grouped.valid_groups == (1, 2, 4)
    assert grouped.exact_rank(2) == min(18 // 3, 2 * 1 * 1)
    assert first.dense_macs_per_pixel == 12 * 3 * 9
    assert first.fga_macs_per_pixel(3, 2) == 2 * 3 * 9 + 12 * 3 * 2


def test_decomposed_layers_are_not_listed_again() -> None:
    model = torchvision.models.resnet18(num_classes=10)
    before = decomposable_layers(model)
    assert len(before) == 20
    new = decompose(model, {"layer1.0.conv1": (2, 4)})
    after = [info.name for info in decomposable_layers(new)]
    assert "layer1.0.conv1" not in after and len(after) == 19
    assert not any(name.startswith("layer1.0.conv1.") for name in after)
