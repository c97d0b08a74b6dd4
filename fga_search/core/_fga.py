"""The filter-group-approximated convolution: a grouped kxk conv followed by a 1x1 conv.

A conv with weight W of shape (n, c/G, kh, kw) (G = the conv's own ``groups``) is split, inside
each of its G groups, into g equal groups of input channels. Each slice W_i, reshaped to an
(n/G) x (c/(G*g)*kh*kw) matrix, is replaced by its best rank-r approximation U_i S_i V_i^T:

* the grouped kxk conv (c -> G*g*r channels, ``groups=G*g``) holds sqrt(S_i) V_i^T;
* the 1x1 conv (G*g*r -> n, ``groups=G``) holds U_i sqrt(S_i) and the original bias.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ._group_svd import GroupSVD, exact_rank, group_svd, validate_geometry

__all__ = ["CPU_EXECUTIONS", "FGAConv2d", "with_cpu_execution"]

# How an FGA pair's grouped conv runs on CPU inputs: as a grouped conv, or as one dense conv whose
# weight is block-diagonal (zeros between the groups; g times the FLOPs, the same output). At
# batch 1 on 2 CPU cores PyTorch runs small grouped convs through oneDNN at 1.3-1.7x the time of
# the dense conv they replace, and the block-diagonal dense conv at 0.7-1.0x of it
# (scripts/bench_cpu_kernels.py), or the whole pair folded back into one dense conv with the
# original layer's geometry (the original's FLOPs and, about, its time: for layers where the pair
# is slower than a dense conv); fga_search.deploy._cpu_execution picks per layer by measurement.
CPU_EXECUTIONS = ("grouped", "block_diagonal", "dense")


def _stamp(t: torch.Tensor) -> tuple[int, int, torch.dtype]:
    """What identifies a weight's current values: its storage, its in-place version counter (-1
    for inference tensors, which keep none: made under ``torch.inference_mode``, they cannot
    change outside it) and its dtype (``.to()`` and ``.double()`` swap ``.data``)."""
    return (t.data_ptr(), -1 if t.is_inference() else t._version, t.dtype)


def _pair(value: int | tuple[int, ...] | str, name: str) -> tuple[int, int] | str:
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return (value, value)
    out = tuple(int(v) for v in value)
    if len(out) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {value!r}")
    return (out[0], out[1])


class FGAConv2d(nn.Module):
    """A conv approximated by filter groups: ``pointwise(grouped(x))``.

    ``grouped`` is a kxk conv with ``base_groups * groups`` groups of ``rank`` filters each;
    ``pointwise`` is a 1x1 conv with ``base_groups`` groups that carries the bias.
    Build one from a trained conv with :meth:`from_conv`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        *,
        groups: int,
        rank: int,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = False,
        padding_mode: str = "zeros",
        base_groups: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        ks = _pair(kernel_size, "kernel_size")
        assert not isinstance(ks, str)
        if in_channels % base_groups or out_channels % base_groups:
            raise ValueError(
                f"base_groups={base_groups} must divide in_channels={in_channels} and out_channels={out_channels}"
            )
        validate_geometry(
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=ks,
            base_groups=base_groups,
            groups=groups,
            rank=rank,
        )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = ks
        self.groups = groups
        self.rank = rank
        self.base_groups = base_groups
        mid = base_groups * groups * rank
        self.grouped = nn.Conv2d(
            in_channels,
            mid,
            ks,
            stride=_pair(stride, "stride"),  # type: ignore[arg-type]
            padding=_pair(padding, "padding"),  # type: ignore[arg-type]
            dilation=_pair(dilation, "dilation"),  # type: ignore[arg-type]
            groups=base_groups * groups,
            bias=False,
            padding_mode=padding_mode,  # type: ignore[arg-type]
            device=device,
            dtype=dtype,
        )
        self.pointwise = nn.Conv2d(
            mid, out_channels, 1, groups=base_groups, bias=bias, device=device, dtype=dtype
        )
        # Set by fga_search.refine: the layer's relative output error before and after refinement.
        self.fit: object | None = None
        self.cpu_execution = "grouped"
        self._block_diagonal: tuple[object, torch.Tensor] | None = None  # (stamp, weight)
        self._dense: tuple[object, torch.Tensor] | None = None

    @property
    def can_run_block_diagonal(self) -> bool:
        """Whether :meth:`set_cpu_execution` accepts ``"block_diagonal"`` and it changes anything."""
        return self.groups > 1 and self.base_groups == 1 and self.padding_mode == "zeros"

    @property
    def can_run_dense(self) -> bool:
        """Whether :meth:`set_cpu_execution` accepts ``"dense"``."""
        return self.padding_mode == "zeros"

    def can_run(self, execution: str) -> bool:
        """Whether the layer can run ``execution`` (one of ``CPU_EXECUTIONS``) and it changes
        anything: ``"grouped"`` always."""
        if execution not in CPU_EXECUTIONS:
            raise ValueError(f"execution must be one of {', '.join(CPU_EXECUTIONS)}, got {execution!r}")
        return {
            "grouped": True,
            "block_diagonal": self.can_run_block_diagonal,
            "dense": self.can_run_dense,
        }[execution]

    def set_cpu_execution(self, execution: str) -> None:
        """How the pair runs on CPU inputs: a grouped conv then the 1x1 conv (``"grouped"``, the
        default); the grouped conv as one dense conv with a block-diagonal weight, then the 1x1
        conv (``"block_diagonal"``); or the pair folded into one dense conv with the original
        layer's geometry (``"dense"``: the same function, the original's FLOPs). The last two are
        for inference only: while gradients flow to the weights, and on other devices, the pair
        runs grouped. The weights and the state_dict do not change."""
        if execution not in CPU_EXECUTIONS:
            raise ValueError(f"execution must be one of {', '.join(CPU_EXECUTIONS)}, got {execution!r}")
        if execution == "block_diagonal" and (self.base_groups != 1 or self.padding_mode != "zeros"):
            raise ValueError(
                "block_diagonal execution needs base_groups=1 and padding_mode='zeros', got "
                f"base_groups={self.base_groups}, padding_mode={self.padding_mode!r}"
            )
        if execution == "dense" and self.padding_mode != "zeros":
            raise ValueError(
                f"dense execution needs padding_mode='zeros', got padding_mode={self.padding_mode!r}"
            )
        self.cpu_execution = execution
        self._block_diagonal = None
        self._dense = None
        # build the cached weight now, not inside the first forward (where a FLOP counter would
        # count the fold); it is rebuilt if the weights change
        if execution == "block_diagonal":
            self.block_diagonal_weight()
        elif execution == "dense":
            self.dense_weight()

    def block_diagonal_weight(self) -> torch.Tensor:
        """The grouped conv's weight as a dense conv's (zeros between the groups), cached until
        the weight changes (checked on every call: it is on the forward path)."""
        w = self._modules["grouped"]._parameters["weight"]  # type: ignore[union-attr]
        assert w is not None
        stamp = _stamp(w)
        cache = self._block_diagonal
        if cache is not None and cache[0] == stamp:
            return cache[1]
        groups = self.grouped.groups
        per_out, per_in = w.shape[0] // groups, w.shape[1]
        with torch.no_grad():
            full = w.new_zeros(w.shape[0], per_in * groups, *w.shape[2:])
            for i in range(groups):
                rows = slice(i * per_out, (i + 1) * per_out)
                full[rows, i * per_in : (i + 1) * per_in] = w[rows]
        self._block_diagonal = (stamp, full)
        return full

    def dense_weight(self) -> torch.Tensor:
        """The pair's weight as one dense conv's (``base_groups`` groups), cached until either
        weight changes (checked on every call: it is on the forward path)."""
        modules = self._modules  # direct lookups: this runs once per forward of a dense layer
        gw = modules["grouped"]._parameters["weight"]  # type: ignore[union-attr]
        pw = modules["pointwise"]._parameters["weight"]  # type: ignore[union-attr]
        assert gw is not None and pw is not None
        stamp = (_stamp(gw), _stamp(pw))
        cache = self._dense
        if cache is not None and cache[0] == stamp:
            return cache[1]
        with torch.no_grad():
            weight = self._folded_weight()
        self._dense = (stamp, weight)
        return weight

    def _folded_weight(self) -> torch.Tensor:
        big_g, g, r = self.base_groups, self.groups, self.rank
        kh, kw = self.kernel_size
        a = self.pointwise.weight.reshape(big_g, self.out_channels // big_g, g, r)  # (G, n/G, g, r)
        b = self.grouped.weight.reshape(big_g, g, r, -1)  # (G, g, r, c/(Gg) k k)
        w = torch.einsum("jnir,jirk->jnik", a, b)  # (G, n/G, g, c/(Gg) k k)
        return w.reshape(self.out_channels, self.in_channels // big_g, kh, kw)

    @property
    def stride(self) -> tuple[int, ...]:
        return self.grouped.stride

    @property
    def padding(self) -> tuple[int, ...] | str:
        return self.grouped.padding

    @property
    def dilation(self) -> tuple[int, ...]:
        return self.grouped.dilation

    @property
    def padding_mode(self) -> str:
        return self.grouped.padding_mode

    @property
    def exact_rank(self) -> int:
        return exact_rank(
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            kernel_size=self.kernel_size,
            base_groups=self.base_groups,
            groups=self.groups,
        )

    @classmethod
    def shaped_like(cls, conv: nn.Conv2d, *, groups: int, rank: int) -> FGAConv2d:
        """An untrained FGA layer with ``conv``'s geometry (stride, padding, dilation as full tuples)."""
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        return cls(
            conv.in_channels,
            conv.out_channels,
            (int(conv.kernel_size[0]), int(conv.kernel_size[1])),
            groups=groups,
            rank=rank,
            stride=tuple(conv.stride),  # type: ignore[arg-type]
            padding=conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),  # type: ignore[arg-type]
            dilation=tuple(conv.dilation),  # type: ignore[arg-type]
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            base_groups=conv.groups,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, groups: int, rank: int) -> FGAConv2d:
        """Approximate a trained ``conv`` by per-group truncated SVD. ``conv`` is not modified."""
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        weight = conv.weight
        if not torch.isfinite(weight).all() or (
            conv.bias is not None and not torch.isfinite(conv.bias).all()
        ):
            raise ValueError("conv has non-finite (NaN or inf) weights; cannot decompose it")
        layer = cls.shaped_like(conv, groups=groups, rank=rank)
        with torch.no_grad():
            layer.load_factors(group_svd(weight, base_groups=conv.groups, groups=groups))
            if conv.bias is not None:
                assert layer.pointwise.bias is not None
                layer.pointwise.bias.copy_(conv.bias)
        return layer

    @torch.no_grad()
    def load_factors(self, svd: GroupSVD) -> None:
        """Set both convs from per-group SVD factors truncated to this layer's rank."""
        big_g, g, r = self.base_groups, self.groups, self.rank
        kh, kw = self.kernel_size
        root = svd.s[..., :r].sqrt()  # (G, g, r)
        first = root.unsqueeze(-1) * svd.vh[..., :r, :]  # (G, g, r, c/(G g) kh kw)
        first = first.reshape(big_g * g * r, self.in_channels // (big_g * g), kh, kw)
        second = svd.u[..., :r] * root.unsqueeze(-2)  # (G, g, n/G, r)
        # pointwise weight (n, g*r, 1, 1): output o of conv group G_j sees columns (i, k) for input group i.
        second = second.permute(0, 2, 1, 3).reshape(self.out_channels, g * r, 1, 1)
        self.grouped.weight.copy_(first)
        self.pointwise.weight.copy_(second)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        execution = self.cpu_execution
        if (
            execution != "grouped"
            and isinstance(x, torch.Tensor)  # not a torch.fx Proxy: symbolic traces get the grouped conv
            and x.is_cpu
            and not (torch.is_grad_enabled() and self._weights_require_grad())
        ):
            # Direct lookups (nn.Module attribute access costs about 0.6 µs a time): at batch 1
            # a small layer's whole conv takes 20-50 µs, so this path is kept lean.
            grouped = self._modules["grouped"]
            assert grouped is not None
            stride, padding, dilation = (
                grouped.__dict__["stride"],
                grouped.__dict__["padding"],
                grouped.__dict__["dilation"],
            )
            if execution == "dense":
                bias = self._modules["pointwise"]._parameters["bias"]  # type: ignore[union-attr]
                return F.conv2d(x, self.dense_weight(), bias, stride, padding, dilation, self.base_groups)
            y = F.conv2d(x, self.block_diagonal_weight(), None, stride, padding, dilation)
            return self.pointwise(y)
        return self.pointwise(self.grouped(x))

    def _weights_require_grad(self) -> bool:
        return self.grouped.weight.requires_grad or self.pointwise.weight.requires_grad

    def to_dense(self) -> nn.Conv2d:
        """Fold the pair back into one dense conv with the original geometry (exact up to rounding)."""
        big_g = self.base_groups
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.grouped.stride,  # type: ignore[arg-type]
            padding=self.grouped.padding,  # type: ignore[arg-type]
            dilation=self.grouped.dilation,  # type: ignore[arg-type]
            groups=big_g,
            bias=self.pointwise.bias is not None,
            padding_mode=self.grouped.padding_mode,
            device=self.grouped.weight.device,
            dtype=self.grouped.weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self._folded_weight())
            if self.pointwise.bias is not None:
                assert conv.bias is not None
                conv.bias.copy_(self.pointwise.bias)
        return conv

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"groups={self.groups}, rank={self.rank}, base_groups={self.base_groups}"
        )


def with_cpu_execution(model: nn.Module, execution: str) -> nn.Module:
    """A copy of ``model`` in which every FGA layer that can run ``execution`` on CPU inputs does
    (``"grouped"``: all of them; ``"block_diagonal"``: those with ``can_run_block_diagonal``;
    ``"dense"``: those with ``can_run_dense``)."""
    if execution not in CPU_EXECUTIONS:
        raise ValueError(f"execution must be one of {', '.join(CPU_EXECUTIONS)}, got {execution!r}")
    out = copy.deepcopy(model)
    for m in out.modules():
        if isinstance(m, FGAConv2d) and m.can_run(execution):
            m.set_cpu_execution(execution)
    return out
