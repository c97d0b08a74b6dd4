from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from fga_search import decompose
from fga_search._runtime_latency import export_latency, onnx_files_latency


def small_cnn(c: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(c, c, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(c, 4),
    ).eval()


@pytest.mark.parametrize(("channels", "hw", "threads"), [(8, 12, 1), (16, 8, 2)])
def test_both_runtimes_time_both_models_and_leave_no_files(
    tmp_path: Path, channels: int, hw: int, threads: int
) -> None:
    original = small_cnn(channels)
    model = decompose(original, {"2": (2, 2)})
    before = torch.get_num_threads()
    lat = export_latency(
        model, original, input_shape=(3, hw, hw), threads=threads, runs=20, onnx=True, scratch=str(tmp_path)
    )
    assert torch.get_num_threads() == before
    assert lat["threads"] == threads and lat["runs"] == 20 and lat["batch"] == 1
    assert lat["device"].endswith(f"({threads} threads)")
    for runtime in ("pytorch", "onnxruntime"):
        r = lat[runtime]
        assert 0 < r["ms"] < 100 and 0 < r["original_ms"] < 100
        assert r["ratio"] == r["ms"] / r["original_ms"]
    assert os.listdir(tmp_path) == []  # the ONNX files were temporary
    only_pytorch = export_latency(model, original, input_shape=(3, hw, hw), runs=10)
    assert "onnxruntime" not in only_pytorch and only_pytorch["threads"] == before


@pytest.mark.parametrize("runs", [0, 9, 2.5, True, "50"])
def test_bad_run_counts_are_refused(runs: object) -> None:
    original = small_cnn(8)
    with pytest.raises(ValueError, match=rf"latency runs must be an integer >= 10, got {runs!r}"):
        export_latency(original, original, input_shape=(3, 8, 8), runs=runs)  # type: ignore[arg-type]


def test_a_given_onnx_file_is_the_one_timed(tmp_path: Path) -> None:
    original = small_cnn(8)
    model = decompose(original, {"2": (2, 2)})
    shipped = tmp_path / "model.onnx"
    with torch.no_grad():
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, 8, 8),),
            str(shipped),
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
        )
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    lat = export_latency(
        model,
        original,
        input_shape=(3, 8, 8),
        runs=10,
        onnx=True,
        onnx_file=str(shipped),
        scratch=str(scratch),
    )
    assert 0 < lat["onnxruntime"]["ms"] < 100 and shipped.is_file() and os.listdir(scratch) == []
    with pytest.raises(Exception, match="nowhere.onnx"):  # the file given is the one opened
        export_latency(
            model,
            original,
            input_shape=(3, 8, 8),
            runs=10,
            onnx=True,
            onnx_file=str(tmp_path / "nowhere.onnx"),
        )
    ms = onnx_files_latency({"a": str(shipped), "b": str(shipped)}, input_shape=(3, 8, 8), threads=1, runs=10)
    assert set(ms) == {"a", "b"} and all(0 < v < 100 for v in ms.values())
