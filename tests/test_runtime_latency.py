from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from fga_search import decompose
from fga_search.deploy._runtime_latency import export_latency, onnx_files_latency
from fga_search.latency import Target


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


class _Recorded:
    """An ONNX Runtime session that notes the batch of every input it runs."""

    def __init__(self, session: object, batches: list[int]) -> None:
        self.session, self.batches = session, batches

    def run(self, names: object, feed: dict[str, object]) -> object:
        self.batches.append(len(feed["input"]))  # type: ignore[arg-type]
        return self.session.run(names, feed)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("channels", "hw", "threads", "batch", "dtype"), [(8, 12, 1, 1, "float32"), (16, 8, 2, 3, "bf16")]
)
def test_both_runtimes_time_both_models_and_leave_no_files(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    channels: int,
    hw: int,
    threads: int,
    batch: int,
    dtype: str,
) -> None:
    """Both runtimes at the target's threads and batch; PyTorch in its dtype, ONNX Runtime in
    float32 (the ONNX file's)."""
    import fga_search.deploy._runtime_latency as runtime_latency

    batches: list[int] = []
    session = runtime_latency._file_session
    monkeypatch.setattr(runtime_latency, "_file_session", lambda *a: _Recorded(session(*a), batches))
    original = small_cnn(channels)
    model = decompose(original, {"2": (2, 2)})
    before = torch.get_num_threads()
    target = Target("cpu", threads, batch, dtype)
    lat = export_latency(
        model, original, input_shape=(3, hw, hw), target=target, runs=20, onnx=True, scratch=str(tmp_path)
    )
    assert torch.get_num_threads() == before
    assert lat["threads"] == threads and lat["runs"] == 20 and lat["batch"] == batch
    assert (
        lat["dtype"] == dtype and lat["memory_format"] == "nchw" and lat["onnxruntime"]["dtype"] == "float32"
    )
    assert lat["device"].endswith(f"({threads} threads)")
    assert len(batches) == 2 * (5 + 20) and set(batches) == {batch}  # warm-up and timed runs, both files
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
    ms = onnx_files_latency(
        {"a": str(shipped), "b": str(shipped)}, input_shape=(3, 8, 8), target=Target("cpu", 1), runs=10
    )
    assert set(ms) == {"a", "b"} and all(0 < v < 100 for v in ms.values())
