from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fga_search import FGAConv2d, build_model
from fga_search.core._bn_fold import conv_bn_pairs, fold_batchnorms, folded_copy


def _trained_bn(bn: nn.BatchNorm2d, seed: int) -> nn.BatchNorm2d:
    """Non-trivial running statistics and affine parameters."""
    gen = torch.Generator().manual_seed(seed)
    c = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=gen))  # type: ignore[union-attr]
        bn.running_var.copy_(torch.rand(c, generator=gen) + 0.5)  # type: ignore[union-attr]
        if bn.affine:
            bn.weight.copy_(torch.randn(c, generator=gen))
            bn.bias.copy_(torch.randn(c, generator=gen))
    return bn


@pytest.mark.parametrize(
    ("c", "n", "stride", "conv_groups", "bias", "affine", "fga"),
    [
        (8, 16, 1, 1, False, True, None),
        (8, 16, 2, 1, True, True, None),
        (8, 8, 1, 2, False, False, None),
        (16, 32, 1, 1, False, True, (4, 3)),
        (16, 16, 2, 1, True, True, (2, 5)),
        (16, 16, 1, 2, False, True, (2, 2)),  # an FGA pair of a grouped conv: a grouped 1x1
    ],
)
def test_folded_model_computes_the_same_function(
    c: int, n: int, stride: int, conv_groups: int, bias: bool, affine: bool, fga: tuple[int, int] | None
) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(c, n, 3, stride=stride, padding=1, groups=conv_groups, bias=bias)
    first: nn.Module = conv if fga is None else FGAConv2d.from_conv(conv, groups=fga[0], rank=fga[1])
    model = (
        nn.Sequential(first, _trained_bn(nn.BatchNorm2d(n, affine=affine), seed=1), nn.ReLU()).double().eval()
    )
    assert conv_bn_pairs(model) == {"0": "1"}
    folded = copy.deepcopy(model)
    fold_batchnorms(folded, {"0": "1"})
    assert isinstance(folded[1], nn.Identity)
    target = folded[0].pointwise if fga else folded[0]
    assert target.bias is not None and target.bias.shape == (n,)
    x = torch.randn(4, c, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-10, atol=1e-10)
    if fga:  # the pair stays a pair, and its other CPU executions follow the folded weights
        for execution in ("dense", "grouped"):
            folded[0].set_cpu_execution(execution)
            with torch.no_grad():
                torch.testing.assert_close(folded(x), model(x), rtol=1e-10, atol=1e-10)


def test_pairs_of_a_resnet_and_the_fold_of_a_trained_one() -> None:
    model = build_model("resnet20", num_classes=10).eval()
    pairs = conv_bn_pairs(model)
    # the stem and both convs of each of the 9 blocks; the option-A shortcut has no conv
    assert len(pairs) == 19 and pairs["conv1"] == "bn1" and pairs["layer2.0.conv2"] == "layer2.0.bn2"
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            _trained_bn(bn, seed=bn.num_features)
    folded = copy.deepcopy(model)
    fold_batchnorms(folded, pairs)
    assert not [m for m in folded.modules() if isinstance(m, nn.BatchNorm2d)]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)


class _Shared(nn.Module):
    """A conv whose output a BN and a skip both read, and a BN called twice: neither folds."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.b, self.bn_b = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c, self.bn_c = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        y = self.bn_a(y) + y
        z = self.bn_b(self.b(y)) + self.bn_b(y)
        return self.bn_c(self.c(z))


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return self.bn(self.conv(x))
        return self.conv(x)


def test_only_a_conv_output_read_by_its_bn_alone_folds() -> None:
    assert conv_bn_pairs(_Shared()) == {"c": "bn_c"}
    assert conv_bn_pairs(_Untraceable()) == {}
    no_stats = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    assert conv_bn_pairs(no_stats) == {}


def test_fold_refuses_pairs_the_model_does_not_hold() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match=r"bn_fold names '0' -> '9', which the model does not hold"):
        fold_batchnorms(model, {"0": "9"})
    with pytest.raises(ValueError, match=r"bn_fold pairs '0' \(Conv2d\) with '2' \(ReLU\): not a conv"):
        fold_batchnorms(model, {"0": "2"})
    assert isinstance(model[1], nn.BatchNorm2d)  # nothing folded before the refusal


def test_folded_copy_leaves_the_model_and_rebuilds_cpu_executions() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    pair = FGAConv2d.from_conv(conv, groups=2, rank=3)
    pair.set_cpu_execution("block_diagonal")  # caches a weight built from the unfolded pointwise
    model = nn.Sequential(pair, _trained_bn(nn.BatchNorm2d(16), seed=2), nn.ReLU()).eval()
    folded = folded_copy(model)
    assert folded is not model and isinstance(model[1], nn.BatchNorm2d)  # the model is untouched
    assert isinstance(folded[1], nn.Identity) and folded[0].cpu_execution == "block_diagonal"
    x = torch.randn(2, 8, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    assert folded_copy(plain) is plain  # nothing to fold: no copy
    assert folded_copy(_Untraceable()).bn is not None  # untraceable: as it is
