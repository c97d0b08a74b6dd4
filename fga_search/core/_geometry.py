"""What can be decomposed in a model: every Conv2d with its geometry and valid group counts."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from ._fga import FGAConv2d
from ._group_svd import exact_rank

__all__ = ["LayerInfo", "decomposable_layers", "divisors"]


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class LayerInfo:
    """Geometry of one Conv2d and the FGA choices it admits.

    ``valid_groups`` are the divisors of the input channels per conv group; ``depthwise`` layers
    (grouped, one input channel per group) cannot be compressed by FGA and are kept by default.
    """

    name: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] | str
    dilation: tuple[int, int]
    base_groups: int
    bias: bool
    padding_mode: str
    valid_groups: tuple[int, ...]
    depthwise: bool

    def exact_rank(self, groups: int) -> int:
        return exact_rank(
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            kernel_size=self.kernel_size,
            base_groups=self.base_groups,
            groups=groups,
        )

    @property
    def dense_macs_per_pixel(self) -> int:
        """Multiply-accumulates per output pixel of the dense conv: n * c/G * kh * kw."""
        kh, kw = self.kernel_size
        return self.out_channels * (self.in_channels // self.base_groups) * kh * kw

    def fga_macs_per_pixel(self, groups: int, rank: int) -> int:
        """MACs per output pixel of the FGA pair: r * c * kh * kw + n * g * r."""
        kh, kw = self.kernel_size
        return rank * self.in_channels * kh * kw + self.out_channels * groups * rank

    @property
    def dense_params(self) -> int:
        return self.dense_macs_per_pixel + (self.out_channels if self.bias else 0)

    def fga_params(self, groups: int, rank: int) -> int:
        return self.fga_macs_per_pixel(groups, rank) + (self.out_channels if self.bias else 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _layer_info(name: str, conv: nn.Conv2d) -> LayerInfo:
    per_group = conv.in_channels // conv.groups
    padding: tuple[int, int] | str
    padding = conv.padding if isinstance(conv.padding, str) else (int(conv.padding[0]), int(conv.padding[1]))
    return LayerInfo(
        name=name,
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel_size=(int(conv.kernel_size[0]), int(conv.kernel_size[1])),
        stride=(int(conv.stride[0]), int(conv.stride[1])),
        padding=padding,
        dilation=(int(conv.dilation[0]), int(conv.dilation[1])),
        base_groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        valid_groups=tuple(divisors(per_group)),
        depthwise=per_group == 1 and conv.groups > 1,
    )


def decomposable_layers(model: nn.Module) -> list[LayerInfo]:
    """Every ``nn.Conv2d`` of ``model`` (outside already-decomposed layers), in module order."""
    out: list[LayerInfo] = []
    skip: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, FGAConv2d):
            skip.append(name + ".")
            continue
        if any(name.startswith(prefix) for prefix in skip):
            continue
        if isinstance(module, nn.Conv2d):
            out.append(_layer_info(name, module))
    return out
