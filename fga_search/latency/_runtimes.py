"""Running a model in a target's runtime: eager PyTorch, TorchScript, or ONNX Runtime.

``runner`` turns a model already on the target (``_latency_measure._prepare``) and its input
into a call that runs one forward pass there, built once and timed many times. ONNX Runtime runs
the model exported as the export writes ``model.onnx`` (``onnx_bytes``: the TorchScript-based
exporter, adaptive pools it refuses swapped for their fixed linear map), in a session with the
target's threads, one inter-op thread and every graph optimisation, as a deployment would,
without spinning threads (so that sessions timed side by side do not steal each other's cores)."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ._latency_target import Target
from ._onnx_pool import onnx_ready

__all__ = ["export_onnx", "onnx_bytes", "onnx_session", "runner"]


def _conv_node(
    name: str, x: str, y: str, weight: torch.Tensor, bias: torch.Tensor | None, conv: Any
) -> tuple[Any, list[Any]]:
    from onnx import helper, numpy_helper

    inits = [numpy_helper.from_array(weight.detach().float().numpy(), f"{name}.weight")]
    inputs = [x, f"{name}.weight"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias.detach().float().numpy(), f"{name}.bias"))
        inputs.append(f"{name}.bias")
    ph, pw = conv["padding"]
    node = helper.make_node(
        "Conv", inputs, [y], name=name, kernel_shape=list(weight.shape[2:]), strides=list(conv["stride"]),
        pads=[ph, pw, ph, pw], dilations=list(conv["dilation"]), group=conv["groups"],
    )  # fmt: skip
    return node, inits


def _layer_onnx(model: nn.Module, example: torch.Tensor) -> bytes | None:
    """A lone conv or FGA pair (the lookup table's layers) as the exporter writes it, built
    directly: one Conv, or two in a row (the pair's grouped, block-diagonal or dense execution).
    About 50x faster than ``torch.onnx.export`` (80 ms a layer), which a table of hundreds of
    candidates would spend minutes in. None for anything else (the exporter handles it)."""
    from fga_search.core._fga import FGAConv2d

    def geometry(conv: nn.Conv2d, groups: int | None = None) -> dict[str, Any] | None:
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            return None
        return {
            "stride": conv.stride,
            "padding": conv.padding,
            "dilation": conv.dilation,
            "groups": groups or conv.groups,
        }

    if type(model) is nn.Conv2d and (g := geometry(model)) is not None:
        convs = [(model.weight, model.bias, g)]
    elif isinstance(model, FGAConv2d) and (g := geometry(model.grouped)) is not None:
        pointwise = {"stride": (1, 1), "padding": (0, 0), "dilation": (1, 1), "groups": 1}
        bias = model.pointwise.bias
        if model.cpu_execution == "dense":
            convs = [(model.dense_weight(), bias, {**g, "groups": model.base_groups})]
        elif model.cpu_execution == "block_diagonal":
            convs = [
                (model.block_diagonal_weight(), None, {**g, "groups": 1}),
                (model.pointwise.weight, bias, pointwise),
            ]
        else:
            convs = [(model.grouped.weight, None, g), (model.pointwise.weight, bias, pointwise)]
    else:
        return None
    from onnx import TensorProto, helper

    nodes, inits = [], []
    names = ["input", *[f"h{i}" for i in range(len(convs) - 1)], "logits"]
    with torch.no_grad():
        for i, (weight, b, geo) in enumerate(convs):
            node, tensors = _conv_node(f"conv{i}", names[i], names[i + 1], weight, b, geo)
            nodes.append(node)
            inits += tensors
    graph = helper.make_graph(
        nodes, "layer",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *example.shape[1:]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        initializer=inits,
    )  # fmt: skip
    return bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())


def export_onnx(model: nn.Module, example: torch.Tensor, destination: str | io.BytesIO) -> None:
    """Export ``model`` to ONNX as the export writes ``model.onnx``: the TorchScript-based
    exporter (the dynamo one needs onnxscript, not a dependency), a dynamic batch axis, input
    ``input`` and output ``logits``, and no gradients, as a deployed model runs (FGA layers then
    take their CPU execution). Adaptive average pools that the exporter refuses at this input size
    are exported as the equivalent fixed linear map (``_onnx_pool``)."""
    with torch.no_grad():
        torch.onnx.export(
            onnx_ready(model, example),
            (example,),
            destination,  # type: ignore[arg-type]  # the TorchScript-based exporter takes a file object
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )


def onnx_bytes(model: nn.Module, example: torch.Tensor) -> bytes:
    """``model`` exported to ONNX in memory (``export_onnx``). A lone conv or FGA pair is built
    directly, op for op as the exporter writes it."""
    direct = _layer_onnx(model, example)
    if direct is not None:
        return direct
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notice
        export_onnx(model, example, buffer)
    return buffer.getvalue()


def onnx_session(model_bytes: bytes, threads: int | None) -> Any:
    """An ONNX Runtime CPU session: ``threads`` intra-op threads (None: PyTorch's count), one
    inter-op thread, every graph optimisation."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    # no spinning: between runs an idle session's threads would spin on the cores that the
    # session timed beside it runs on (two identical ResNet-56 sessions timed 1.94 vs 1.44 ms)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def runner(model: nn.Module, x: torch.Tensor, target: Target) -> Callable[[], object]:
    """One forward pass of ``model`` on ``x`` in ``target.runtime``, prepared once."""
    if target.runtime == "eager":
        return lambda: model(x)
    if target.runtime == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings on shape-dependent Python code
            traced = torch.jit.freeze(torch.jit.trace(model.eval(), (x,), check_trace=False))
            scripted = torch.jit.optimize_for_inference(traced)
        return lambda: scripted(x)
    if target.runtime == "onnxruntime":
        session = onnx_session(onnx_bytes(model, x), target.threads)  # float32: Target checks it
        feed = {"input": x.contiguous().numpy()}
        return lambda: session.run(None, feed)
    raise ValueError(f"target runtime must be eager, onnxruntime or torchscript, got {target.runtime!r}")
