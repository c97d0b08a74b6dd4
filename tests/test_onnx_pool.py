from __future__ import annotations

import warnings

import numpy as np
import onnxruntime
import pytest
import torch
import torchvision
from torch import nn

from fga_search.deploy._runtime_latency import write_onnx
from fga_search.latency._onnx_pool import FixedAdaptiveAvgPool2d, onnx_ready


@pytest.mark.parametrize(
    ("input_hw", "output_size"),
    [
        ((1, 1), (7, 7)),
        ((2, 2), (7, 7)),
        ((3, 5), (7, 6)),
        ((13, 13), (6, 6)),
        ((5, 7), (3, None)),
        ((8, 8), 3),
    ],
)
def test_fixed_pool_matches_adaptive_pool(input_hw: tuple[int, int], output_size: object) -> None:
    pool = nn.AdaptiveAvgPool2d(output_size)  # type: ignore[arg-type]
    x = torch.randn(2, 3, *input_hw, dtype=torch.float64)
    expected = pool(x)
    fixed = FixedAdaptiveAvgPool2d(input_hw, tuple(expected.shape[-2:])).double()  # type: ignore[arg-type]
    torch.testing.assert_close(fixed(x), expected)


def test_onnx_ready_swaps_only_pools_the_exporter_refuses() -> None:
    resnet = torchvision.models.resnet18(num_classes=10).eval()  # pools 2x2 to 1x1: left alone
    assert onnx_ready(resnet, torch.randn(1, 3, 64, 64)) is resnet
    vgg = torchvision.models.vgg11(num_classes=10).eval()  # pools 1x1 to 7x7 at 32x32 inputs
    example = torch.randn(2, 3, 32, 32)
    ready = onnx_ready(vgg, example)
    assert ready is not vgg
    assert type(vgg.avgpool) is nn.AdaptiveAvgPool2d  # the model given is not modified
    assert isinstance(ready.avgpool, FixedAdaptiveAvgPool2d)
    assert (ready.avgpool.input_hw, ready.avgpool.output_hw) == ((1, 1), (7, 7))
    with torch.no_grad():
        torch.testing.assert_close(ready(example), vgg(example))


def test_write_onnx_exports_a_torchvision_vgg_at_cifar_size(tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = torchvision.models.vgg11(num_classes=10).eval()
    example = torch.randn(1, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception, match="adaptive_avg_pool2d"):  # the exporter alone refuses it
            torch.onnx.export(model, (example,), str(tmp_path / "plain.onnx"), dynamo=False)
        write_onnx(model, example, str(tmp_path / "model.onnx"))
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = torch.randn(3, 3, 32, 32)  # the batch axis stays dynamic
    (out,) = session.run(["logits"], {"input": batch.numpy()})
    with torch.no_grad():
        expected = model(batch).numpy()
    assert out.shape == (3, 10)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
