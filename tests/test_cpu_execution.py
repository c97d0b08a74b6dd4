from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from fga_search import FGAConv2d, decompose
from fga_search.deploy._cpu_execution import apply_cpu_execution, choose_cpu_execution
from fga_search.latency import Target

PLAN = {"0": (1, 2), "2": (2, 3), "4": (4, 2)}  # "0" has g = 1: grouped or dense, no block-diagonal


def cnn(c: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(c, c, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Conv2d(c, c, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(c, 5),
    ).eval()


def executions(model: nn.Module) -> dict[str, str]:
    return {n: m.cpu_execution for n, m in model.named_modules() if isinstance(m, FGAConv2d)}


@pytest.mark.parametrize(
    ("channels", "hw", "target"),
    [
        (12, 16, None),
        (24, 8, None),
        (12, 8, Target("cpu", 1, 3, "bf16")),
        (8, 8, Target("cpu", 2, 2, "fp16")),
    ],
)
def test_choice_is_measured_and_keeps_the_outputs(channels: int, hw: int, target: Target | None) -> None:
    model = decompose(cnn(channels), PLAN)
    x = torch.randn(2, 3, hw, hw)
    with torch.no_grad():
        before = model(x)
    result = choose_cpu_execution(model, input_shape=(3, hw, hw), target=target, runs=10)
    assert result["candidates"] == 3 and result["runs"] == 10
    assert set(result["layers"]) <= {"0", "2", "4"}
    assert set(result["layers"].values()) <= {"block_diagonal", "dense"}
    assert result["layers"].get("0", "dense") == "dense"
    assert result["kept"] == bool(result["layers"])
    # the whole model was timed before and after, whichever way it went: kept only if faster
    assert result["before_ms"] > 0 and result["after_ms"] > 0
    assert result["kept"] == (result["after_ms"] < result["before_ms"])
    expected = {"0": "grouped", "2": "grouped", "4": "grouped", **result["layers"]}
    assert executions(model) == expected
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)


def timer(ms: dict[str, float]) -> Any:
    """Stands in for the clock: fixed medians per label, to test the decision, not the machine."""

    def measure(models: dict[str, nn.Module], **_: object) -> dict[str, float]:
        return {name: ms[name] for name in models}

    return measure


PER_LAYER = {"0": "dense", "2": "block_diagonal", "4": "block_diagonal"}
ALL_BLOCK_DIAGONAL = {"2": "block_diagonal", "4": "block_diagonal"}  # "0" (g = 1) stays grouped
ALL_DENSE = {"0": "dense", "2": "dense", "4": "dense"}


@pytest.mark.parametrize(
    ("after", "all_block", "all_dense", "kept"),
    [
        (0.9, 0.97, 0.95, PER_LAYER),
        (0.95, 0.97, 0.9, ALL_DENSE),
        (0.95, 0.9, 0.97, ALL_BLOCK_DIAGONAL),  # what a trial's measurement may have run
        (1.1, 1.3, 1.2, {}),
        (1.0, 1.0, 1.0, {}),
    ],
)
def test_the_whole_model_decides(
    monkeypatch: pytest.MonkeyPatch, after: float, all_block: float, all_dense: float, kept: dict[str, str]
) -> None:
    # per layer: block-diagonal fastest where it can run ("2", "4"), else dense ("0": g = 1)
    ms = {"grouped": 2.0, "block_diagonal": 1.0, "dense": 1.5, "before": 1.0, "after": after}
    ms.update({"all block-diagonal": all_block, "all dense": all_dense})
    monkeypatch.setattr("fga_search.deploy._cpu_execution.measure_side_by_side", timer(ms))
    model = decompose(cnn(12), PLAN)
    result = choose_cpu_execution(model, input_shape=(3, 16, 16))
    assert result["kept"] is bool(kept) and result["layers"] == kept
    assert result["before_ms"] == 1.0 and result["after_ms"] == min(after, all_block, all_dense)
    assert result["per_layer_ms"] == after and result["all_dense_ms"] == all_dense
    assert result["all_block_diagonal_ms"] == all_block
    assert executions(model) == {"0": "grouped", "2": "grouped", "4": "grouped", **kept}


def test_dense_is_chosen_where_it_is_fastest(monkeypatch: pytest.MonkeyPatch) -> None:
    ms = {"grouped": 2.0, "block_diagonal": 1.5, "dense": 1.0, "before": 1.0, "after": 0.5, "all dense": 0.6}
    ms["all block-diagonal"] = 0.7
    monkeypatch.setattr("fga_search.deploy._cpu_execution.measure_side_by_side", timer(ms))
    model = decompose(cnn(12), PLAN)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        before = model(x)
    result = choose_cpu_execution(model, input_shape=(3, 16, 16))
    assert result["layers"] == ALL_DENSE and result["kept"] and result["after_ms"] == 0.5
    assert executions(model) == result["layers"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("all_dense", "kept"), [(1.5, {}), (0.5, ALL_DENSE)])
def test_layers_faster_grouped_alone_can_still_run_dense(
    monkeypatch: pytest.MonkeyPatch, all_dense: float, kept: dict[str, str]
) -> None:
    # no layer is faster another way alone; the whole model folded dense, or block-diagonal, is
    # tried all the same
    ms = {"grouped": 1.0, "block_diagonal": 2.0, "dense": 1.5, "before": 1.0, "all dense": all_dense}
    ms["all block-diagonal"] = 1.2
    monkeypatch.setattr("fga_search.deploy._cpu_execution.measure_side_by_side", timer(ms))
    model = decompose(cnn(12), PLAN)
    result = choose_cpu_execution(model, input_shape=(3, 16, 16))
    assert result["layers"] == kept and result["kept"] is bool(kept) and result["candidates"] == 3
    assert result["per_layer_ms"] is None and result["all_dense_ms"] == all_dense
    # without the dense way, every grouped conv block-diagonal is left to try
    for all_block, chosen in ((1.2, {}), (0.8, ALL_BLOCK_DIAGONAL)):
        ms["all block-diagonal"] = all_block
        model = decompose(cnn(12), PLAN)
        result = choose_cpu_execution(
            model, input_shape=(3, 16, 16), executions=("grouped", "block_diagonal")
        )
        assert result["layers"] == chosen and result["candidates"] == 2 and result["all_dense_ms"] is None
        assert result["all_block_diagonal_ms"] == all_block and executions(model) == {
            "0": "grouped", "2": "grouped", "4": "grouped", **chosen
        }  # fmt: skip
    assert choose_cpu_execution(cnn(12), input_shape=(3, 16, 16))["candidates"] == 0  # no FGA layer


def test_each_layer_geometry_is_timed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Layers of one geometry (channels, kernel, stride, groups, rank, input size) share one
    timing and one pick; ``memo`` carries the picks over to the next model."""
    timed: list[list[str]] = []
    ms = {"grouped": 2.0, "block_diagonal": 1.0, "dense": 1.5, "before": 1.0, "after": 0.5}
    ms.update({"all block-diagonal": 0.7, "all dense": 0.9})

    def measure(models: dict[str, nn.Module], **_: object) -> dict[str, float]:
        timed.append(list(models))
        return {name: ms[name] for name in models}

    monkeypatch.setattr("fga_search.deploy._cpu_execution.measure_side_by_side", measure)
    torch.manual_seed(0)
    same = nn.Sequential(*(nn.Conv2d(8, 8, 3, padding=1) for _ in range(4))).eval()
    plan = {"0": (2, 3), "1": (2, 3), "2": (2, 3), "3": (4, 2)}  # two geometries
    memo: dict[tuple[object, ...], str] = {}
    result = choose_cpu_execution(decompose(same, plan), input_shape=(8, 8, 8), memo=memo)
    layer_timings = [t for t in timed if "grouped" in t]
    assert len(layer_timings) == 2 and len(memo) == 2
    assert result["layers"] == {name: "block_diagonal" for name in plan} and result["kept"]
    timed.clear()
    again = choose_cpu_execution(decompose(same, {**plan, "3": (2, 3)}), input_shape=(8, 8, 8), memo=memo)
    assert [t for t in timed if "grouped" in t] == []  # every geometry already timed
    assert again["layers"] == {name: "block_diagonal" for name in plan}
    timed.clear()
    choose_cpu_execution(decompose(same, plan), input_shape=(8, 16, 16), memo=memo)
    assert len([t for t in timed if "grouped" in t]) == 2  # another input size: timed anew


def test_every_timing_is_on_the_target_and_each_target_is_timed_anew(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run's ``cpu:N`` target with its batch and dtype is where the export's choice is timed:
    the layers and the whole model alike; a layer geometry timed on one target is timed anew on
    another (its batch, dtype or threads change which way is fastest)."""
    ms = {"grouped": 2.0, "block_diagonal": 1.0, "dense": 1.5, "before": 1.0, "after": 0.5}
    ms.update({"all block-diagonal": 0.7, "all dense": 0.9})
    seen: list[tuple[Target, tuple[int, ...]]] = []

    def measure(
        models: dict[str, nn.Module], *, input_shape: tuple[int, ...], target: Target, **_: object
    ) -> dict[str, float]:
        seen.append((target, tuple(input_shape)))
        return {name: ms[name] for name in models}

    monkeypatch.setattr("fga_search.deploy._cpu_execution.measure_side_by_side", measure)
    memo: dict[tuple[object, ...], str] = {}
    batched = Target("cpu", 1, 8, "bf16")
    choose_cpu_execution(decompose(cnn(12), PLAN), input_shape=(3, 16, 16), target=batched, memo=memo)
    assert len(seen) == 4 and {t for t, _ in seen} == {batched}  # 3 layers, then the whole model
    assert seen[-1][1] == (3, 16, 16) and seen[0][1] == (3, 16, 16) and seen[1][1] == (12, 16, 16)
    seen.clear()
    choose_cpu_execution(decompose(cnn(12), PLAN), input_shape=(3, 16, 16), target=batched, memo=memo)
    assert len(seen) == 1  # every geometry already timed on this target: only the whole model
    seen.clear()
    choose_cpu_execution(decompose(cnn(12), PLAN), input_shape=(3, 16, 16), memo=memo)
    assert len(seen) == 4 and {t for t, _ in seen} == {Target("cpu")}  # batch 1, float32: anew
    with pytest.raises(ValueError, match="target must be a CPU target, got 'cuda'"):
        choose_cpu_execution(decompose(cnn(12), PLAN), input_shape=(3, 16, 16), target=Target("cuda"))


def test_the_ways_tried_can_be_limited(monkeypatch: pytest.MonkeyPatch) -> None:
    ms = {"grouped": 2.0, "block_diagonal": 1.5, "dense": 1.0, "before": 1.0, "after": 0.5}
    monkeypatch.setattr("fga_search.deploy._cpu_execution.measure_side_by_side", timer(ms))
    model = decompose(cnn(12), PLAN)
    result = choose_cpu_execution(model, input_shape=(3, 16, 16), executions=("grouped", "block_diagonal"))
    assert result["candidates"] == 2 and result["layers"] == {"2": "block_diagonal", "4": "block_diagonal"}
    model = decompose(cnn(12), PLAN)
    result = choose_cpu_execution(model, input_shape=(3, 16, 16), executions=("grouped",))
    assert result == {"layers": {}, "candidates": 0, "kept": False, "runs": 50}


def test_bad_input() -> None:
    model = decompose(cnn(12), PLAN)
    with pytest.raises(ValueError, match="runs must be an integer >= 10, got 5"):
        choose_cpu_execution(model, input_shape=(3, 16, 16), runs=5)
    with pytest.raises(ValueError, match="cpu_execution names '1', which is not an FGA layer of the model"):
        apply_cpu_execution(model, {"1": "block_diagonal"})
    with pytest.raises(ValueError, match="cpu_execution names 'nowhere', which is not an FGA layer"):
        apply_cpu_execution(model, {"nowhere": "block_diagonal"})
    with pytest.raises(
        ValueError, match="execution must be one of grouped, block_diagonal, dense, got 'fast'"
    ):
        apply_cpu_execution(model, {"2": "fast"})
    for bad in ("dense", ("dense", "fast")):
        with pytest.raises(
            ValueError, match="executions must be a sequence of grouped, block_diagonal, dense, got"
        ):
            choose_cpu_execution(model, input_shape=(3, 16, 16), executions=bad)
