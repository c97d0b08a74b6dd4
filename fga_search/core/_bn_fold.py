"""Batch-norm folding for inference: a BN that directly follows a conv is folded into it.

In eval mode ``bn(conv(x))`` is ``conv'(x)`` with ``W' = W * s`` and ``b' = (b - mean) * s + beta``
per output channel, ``s = gamma / sqrt(var + eps)``. For an FGA pair the 1x1 conv takes the fold
(it produces the output channels), so the pair stays a pair and keeps its CPU execution. The BN
module becomes ``nn.Identity``: the module tree and every other name stay as they were, so an
exported model is rebuilt by folding the recorded pairs after loading its unfolded state_dict.

Which BNs follow which conv is read from a ``torch.fx`` trace of the model: a BN is folded only
when its one input is a conv's output that nothing else reads, and neither module is called more
than once. A model that cannot be traced folds nothing.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Mapping

import torch
from torch import fx, nn

from ._fga import FGAConv2d
from ._surgery import _set_submodule

__all__ = ["conv_bn_pairs", "fold_batchnorms"]


class _Tracer(fx.Tracer):
    """FGA pairs are leaves, as ``nn.Conv2d`` is: a pair is named by the conv it replaced."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, FGAConv2d) or super().is_leaf_module(m, module_qualified_name)


def conv_bn_pairs(model: nn.Module) -> dict[str, str]:
    """``{conv name: BN name}`` for each ``BatchNorm2d`` (with running statistics) whose input is
    only a conv's output (``nn.Conv2d`` or FGA pair), in model order; ``{}`` if ``model`` cannot be
    traced by ``torch.fx``."""
    try:
        graph = _Tracer().trace(model)
    except Exception:  # data-dependent control flow, unsupported ops: fold nothing
        return {}
    modules = dict(model.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    pairs: dict[str, str] = {}
    for node in graph.nodes:
        bn = modules.get(str(node.target)) if node.op == "call_module" else None
        if not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None or bn.running_var is None:
            continue
        if len(node.args) != 1 or node.kwargs or calls[node.target] != 1:
            continue
        source = node.args[0]
        if not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1:
            continue
        conv = modules.get(str(source.target))
        if (
            isinstance(conv, (nn.Conv2d, FGAConv2d))
            and calls[source.target] == 1
            and conv.out_channels == bn.num_features
        ):
            pairs[str(source.target)] = str(node.target)
    return pairs


@torch.no_grad()
def fold_batchnorms(model: nn.Module, pairs: Mapping[str, str]) -> None:
    """Fold each named BN into its conv, in place (for inference: the BN's batch statistics and
    its training behaviour are gone). ``ValueError`` names a pair that the model does not hold."""
    for conv_name, bn_name in pairs.items():
        try:
            conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        except AttributeError:
            raise ValueError(
                f"bn_fold names {conv_name!r} -> {bn_name!r}, which the model does not hold"
            ) from None
        target = conv.pointwise if isinstance(conv, FGAConv2d) else conv
        if (
            not isinstance(target, nn.Conv2d)
            or not isinstance(bn, nn.BatchNorm2d)
            or bn.running_mean is None
            or bn.running_var is None
            or target.out_channels != bn.num_features
        ):
            raise ValueError(
                f"bn_fold pairs {conv_name!r} ({type(conv).__name__}) with {bn_name!r} "
                f"({type(bn).__name__}): not a conv followed by a BatchNorm2d of as many channels"
            )
        weight = target.weight
        scale = torch.rsqrt(bn.running_var.to(weight.dtype) + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.to(weight.dtype)
        bias = target.bias if target.bias is not None else torch.zeros_like(scale)
        shift = (bias - bn.running_mean.to(weight.dtype)) * scale
        if bn.bias is not None:
            shift = shift + bn.bias.to(weight.dtype)
        target.weight = nn.Parameter(weight * scale.reshape(-1, 1, 1, 1), requires_grad=weight.requires_grad)
        target.bias = nn.Parameter(shift, requires_grad=weight.requires_grad)
        _set_submodule(model, bn_name, nn.Identity())


def folded_copy(model: nn.Module, pairs: Mapping[str, str] | None = None) -> nn.Module:
    """A copy of ``model`` with the BNs of ``pairs`` folded (default: every foldable one,
    ``conv_bn_pairs``) and its FGA layers' CPU executions rebuilt from the folded weights;
    ``model`` itself when no BN can be folded."""
    if pairs is None:
        if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
            return model
        pairs = conv_bn_pairs(model)
    if not pairs:
        return model
    folded = copy.deepcopy(model)
    fold_batchnorms(folded, pairs)
    for module in folded.modules():  # cached block-diagonal / dense weights, from the folded ones
        if isinstance(module, FGAConv2d) and module.cpu_execution != "grouped":
            module.set_cpu_execution(module.cpu_execution)
    return folded
