from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fga_search import FGAConv2d
from fga_search.core._group_svd import group_svd

GEOMETRIES = {
    "plain": dict(in_channels=16, out_channels=24, kernel_size=3, padding=1),
    "stride2": dict(in_channels=16, out_channels=32, kernel_size=3, stride=2, padding=1),
    "dilation2": dict(in_channels=16, out_channels=16, kernel_size=3, dilation=2, padding=2),
    "k1x7": dict(in_channels=12, out_channels=20, kernel_size=(1, 7), padding=(0, 3)),
    "k7x1": dict(in_channels=12, out_channels=20, kernel_size=(7, 1), padding=(3, 0)),
    "same": dict(in_channels=8, out_channels=8, kernel_size=4, padding="same"),
    "reflect": dict(in_channels=8, out_channels=12, kernel_size=3, padding=1, padding_mode="reflect"),
    "bias": dict(in_channels=8, out_channels=12, kernel_size=3, padding=1, bias=True),
    "conv_groups2": dict(in_channels=16, out_channels=24, kernel_size=3, padding=1, groups=2),
    "conv_groups4_stride2_bias": dict(
        in_channels=16, out_channels=8, kernel_size=3, stride=2, groups=4, bias=True
    ),
    "pointwise": dict(in_channels=32, out_channels=64, kernel_size=1),
    "asym_stride": dict(in_channels=8, out_channels=8, kernel_size=3, stride=(2, 1), padding=(1, 0)),
}


def make_conv(geometry: dict) -> nn.Conv2d:
    kwargs = {"bias": False, **geometry}
    return nn.Conv2d(**kwargs).double()


@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=GEOMETRIES.keys())
@pytest.mark.parametrize("g_index", [0, 1, -1])
def test_full_rank_is_exact(geometry: dict, g_index: int) -> None:
    conv = make_conv(geometry)
    per_group = conv.in_channels // conv.groups
    divisors = [d for d in range(1, per_group + 1) if per_group % d == 0]
    g = divisors[g_index]
    probe = FGAConv2d.shaped_like(conv, groups=g, rank=1)
    layer = FGAConv2d.from_conv(conv, groups=g, rank=probe.exact_rank)
    x = torch.randn(3, conv.in_channels, 15, 13, dtype=torch.float64)
    expected = conv(x)
    got = layer(x)
    assert got.shape == expected.shape
    rel = ((got - expected).norm() / expected.norm()).item()
    assert rel < 1e-5, rel
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_geometry_is_copied_as_full_tuples(geometry: dict) -> None:
    conv = make_conv(geometry)
    layer = FGAConv2d.from_conv(conv, groups=1, rank=1)
    assert layer.grouped.stride == tuple(conv.stride) and len(layer.grouped.stride) == 2
    assert layer.grouped.dilation == tuple(conv.dilation)
    assert layer.grouped.padding == conv.padding
    assert layer.grouped.padding_mode == conv.padding_mode
    assert layer.grouped.groups == conv.groups
    assert layer.pointwise.groups == conv.groups
    assert (layer.pointwise.bias is None) == (conv.bias is None)
    assert layer.grouped.weight.dtype == torch.float64


@pytest.mark.parametrize(
    ("n", "c", "k", "g", "r"), [(32, 16, 3, 1, 5), (32, 16, 3, 4, 3), (24, 48, 1, 8, 2), (16, 16, 3, 2, 7)]
)
def test_truncation_error_is_eckart_young_tail(n: int, c: int, k: int, g: int, r: int) -> None:
    conv = nn.Conv2d(c, n, k, bias=False).double()
    layer = FGAConv2d.from_conv(conv, groups=g, rank=r)
    dense = layer.to_dense()
    svd = group_svd(conv.weight, base_groups=1, groups=g)
    for i in range(g):
        sl = slice(i * c // g, (i + 1) * c // g)
        diff = (conv.weight[:, sl] - dense.weight[:, sl]).reshape(n, -1)
        err2 = float(diff.pow(2).sum())
        tail = float(svd.s[0, i, r:].pow(2).sum())
        assert math.isclose(err2, tail, rel_tol=1e-6, abs_tol=1e-10)
    total_rel = float((conv.weight - dense.weight).norm() / conv.weight.norm())
    assert math.isclose(total_rel, svd.relative_error(r), rel_tol=1e-6)


def test_macs_formula_matches_layer_shapes() -> None:
    conv = nn.Conv2d(64, 128, 3, padding=1)
    layer = FGAConv2d.from_conv(conv, groups=4, rank=6)
    n, c, k, g, r = 128, 64, 9, 4, 6
    assert layer.grouped.weight.numel() == r * c * k
    assert layer.pointwise.weight.numel() == n * g * r


@pytest.mark.parametrize(
    ("groups", "rank", "message"),
    [
        (3, 1, "groups=3 does not divide the 16 input channels"),
        (0, 1, "groups must be a positive int"),
        (2, 0, "rank=0 is out of range for groups=2: valid ranks are 1..32"),
        (2, 33, "rank=33 is out of range for groups=2: valid ranks are 1..32"),
        (16, 10, "rank=10 is out of range for groups=16: valid ranks are 1..9"),
    ],
)
def test_bad_groups_and_rank(groups: int, rank: int, message: str) -> None:
    conv = nn.Conv2d(16, 32, 3)
    with pytest.raises(ValueError, match=message):
        FGAConv2d.from_conv(conv, groups=groups, rank=rank)


def test_groups_must_divide_the_conv_own_groups() -> None:
    conv = nn.Conv2d(16, 16, 3, groups=4)  # 4 input channels per conv group
    with pytest.raises(ValueError, match="groups=8 does not divide the 4 input channels per conv group"):
        FGAConv2d.from_conv(conv, groups=8, rank=1)


def test_non_finite_weights_are_refused() -> None:
    conv = nn.Conv2d(4, 4, 3)
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        FGAConv2d.from_conv(conv, groups=1, rank=2)


def test_source_conv_is_not_modified() -> None:
    conv = nn.Conv2d(8, 8, 3, bias=True)
    before = {k: v.clone() for k, v in conv.state_dict().items()}
    layer = FGAConv2d.from_conv(conv, groups=2, rank=3)
    with torch.no_grad():
        layer.pointwise.weight.add_(1.0)
        assert layer.pointwise.bias is not None
        layer.pointwise.bias.add_(1.0)
    for key, value in conv.state_dict().items():
        assert torch.equal(value, before[key])
    assert layer.pointwise.weight.data_ptr() != conv.weight.data_ptr()


def test_from_conv_does_not_track_gradients() -> None:
    conv = nn.Conv2d(8, 8, 3)
    layer = FGAConv2d.from_conv(conv, groups=2, rank=3)
    assert layer.grouped.weight.grad_fn is None and layer.grouped.weight.requires_grad
    assert layer.pointwise.weight.grad_fn is None


def test_to_dense_round_trip() -> None:
    conv = nn.Conv2d(12, 10, 3, stride=2, padding=1, groups=2, bias=True).double()
    layer = FGAConv2d.from_conv(conv, groups=3, rank=4)
    x = torch.randn(2, 12, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(layer.to_dense()(x), layer(x))


def small_rank_layer(geometry: dict, g_index: int) -> tuple[nn.Conv2d, FGAConv2d, torch.Tensor, torch.Tensor]:
    """The conv, its FGA layer at the g_index-th group count and rank <= 2, an input, and the
    layer's output on it (grouped execution)."""
    conv = make_conv(geometry)
    per_group = conv.in_channels // conv.groups
    g = [d for d in range(1, per_group + 1) if per_group % d == 0][g_index]
    rank = min(2, FGAConv2d.shaped_like(conv, groups=g, rank=1).exact_rank)
    layer = FGAConv2d.from_conv(conv, groups=g, rank=rank)
    x = torch.randn(2, conv.in_channels, 11, 9, dtype=torch.float64)
    with torch.no_grad():
        expected = layer(x)
    return conv, layer, x, expected


def check_cpu_execution(layer: FGAConv2d, conv: nn.Conv2d, x: torch.Tensor, expected: torch.Tensor) -> None:
    """A layer set to another CPU execution: the same outputs and state_dict; its cached weight
    follows in-place changes of either weight; with gradients on, the pair runs grouped."""
    with torch.no_grad():
        got = layer(x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert layer.state_dict().keys() == {
        "grouped.weight",
        "pointwise.weight",
        *(["pointwise.bias"] if conv.bias is not None else []),
    }
    with torch.no_grad():
        for weight, factor in ((layer.grouped.weight, 2.0), (layer.pointwise.weight, -1.0)):
            weight.mul_(factor)
            torch.testing.assert_close(layer(x), layer.pointwise(layer.grouped(x)), rtol=1e-10, atol=1e-12)
    got = layer(x)
    assert got.requires_grad and got.grad_fn is not None
    got.sum().backward()
    assert layer.grouped.weight.grad is not None and layer.pointwise.weight.grad is not None


@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=GEOMETRIES.keys())
@pytest.mark.parametrize("g_index", [1, -1])
def test_block_diagonal_cpu_execution_matches_grouped(geometry: dict, g_index: int) -> None:
    conv, layer, x, expected = small_rank_layer(geometry, g_index)
    g, rank = layer.groups, layer.rank
    if conv.groups != 1 or conv.padding_mode != "zeros":
        with pytest.raises(
            ValueError, match="block_diagonal execution needs base_groups=1 and padding_mode='zeros'"
        ):
            layer.set_cpu_execution("block_diagonal")
        return
    layer.set_cpu_execution("block_diagonal")
    w = layer.block_diagonal_weight()
    assert w.shape == (g * rank, conv.in_channels, *layer.kernel_size)
    assert int((w != 0).sum()) == int((layer.grouped.weight != 0).sum())  # zeros between the groups
    check_cpu_execution(layer, conv, x, expected)
    with pytest.raises(
        ValueError, match="execution must be one of grouped, block_diagonal, dense, got 'fast'"
    ):
        layer.set_cpu_execution("fast")


@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=GEOMETRIES.keys())
@pytest.mark.parametrize("g_index", [0, -1])
def test_dense_cpu_execution_matches_grouped(geometry: dict, g_index: int) -> None:
    conv, layer, x, expected = small_rank_layer(geometry, g_index)
    if conv.padding_mode != "zeros":
        assert not layer.can_run_dense
        with pytest.raises(ValueError, match="dense execution needs padding_mode='zeros', got padding_mode="):
            layer.set_cpu_execution("dense")
        return
    assert layer.can_run_dense
    layer.set_cpu_execution("dense")
    # it runs as the original conv does: the fold is done once, before, not counted in a forward
    with torch.no_grad():
        with FlopCounterMode(display=False) as counted:
            layer(x)
        with FlopCounterMode(display=False) as original:
            conv(x)
    assert counted.get_total_flops() == original.get_total_flops() > 0
    w = layer.dense_weight()
    assert w.shape == conv.weight.shape  # the original layer's geometry, base groups included
    torch.testing.assert_close(w, layer.to_dense().weight.detach(), rtol=0, atol=0)
    assert layer.dense_weight() is w  # cached
    check_cpu_execution(layer, conv, x, expected)
    layer.float()  # swaps the weights' .data: the cached weight follows
    with torch.no_grad():
        got = layer(x.float())
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, layer.pointwise(layer.grouped(x.float())), rtol=1e-5, atol=1e-5)


def test_block_diagonal_layers_trace_symbolically() -> None:
    conv = nn.Conv2d(8, 12, 3, padding=1, bias=False)
    layer = FGAConv2d.from_conv(conv, groups=4, rank=2)
    layer.set_cpu_execution("block_diagonal")
    traced = torch.fx.symbolic_trace(nn.Sequential(layer, nn.ReLU()))
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), torch.relu(layer(x)), rtol=1e-5, atol=1e-6)
