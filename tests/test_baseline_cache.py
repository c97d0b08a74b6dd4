from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from fga_search.data._data import Split
from fga_search.train._baseline_cache import BaselineCache, accuracy_key


def tiny_split(n: int = 8, seed: int = 0) -> Split:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 8, 8), generator=gen, dtype=torch.uint8)
    return Split(images, torch.arange(n, dtype=torch.int64) % 3)


NORM = {"mean": [0.5], "std": [0.25]}
CPU = torch.device("cpu")


def test_key_changes_with_everything_that_decides_the_accuracy() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.LazyLinear(3))
    model(torch.zeros(1, 1, 8, 8))
    split = tiny_split()
    key = accuracy_key(model, split, normalization=NORM, device=CPU, amp_dtype=None)
    assert key == accuracy_key(
        copy.deepcopy(model), tiny_split(), normalization=NORM, device=CPU, amp_dtype=None
    )
    nudged = copy.deepcopy(model)
    with torch.no_grad():
        nudged[0].weight[0, 0, 0, 0] += 1e-6
    relabelled = tiny_split()
    relabelled.labels[0] = 2
    other_split = tiny_split(seed=1)
    keys = {
        key,
        accuracy_key(nudged, split, normalization=NORM, device=CPU, amp_dtype=None),
        accuracy_key(model, relabelled, normalization=NORM, device=CPU, amp_dtype=None),
        accuracy_key(model, other_split, normalization=NORM, device=CPU, amp_dtype=None),
        accuracy_key(model, split, normalization={"mean": [0.4], "std": [0.25]}, device=CPU, amp_dtype=None),
        accuracy_key(model, split, normalization=NORM, device=CPU, amp_dtype=torch.bfloat16),
        accuracy_key(nn.Sequential(*model, nn.ReLU()), split, normalization=NORM, device=CPU, amp_dtype=None),
    }
    assert len(keys) == 7


def test_cache_round_trip_and_a_damaged_file(tmp_path: Path) -> None:
    cache = BaselineCache(str(tmp_path / "sub" / "acc.json"))
    assert cache.get("a") is None
    cache.put("a", 0.75)
    cache.put("b", 0.5)
    assert (cache.get("a"), cache.get("b")) == (0.75, 0.5)
    assert json.loads((tmp_path / "sub" / "acc.json").read_text()) == {"a": 0.75, "b": 0.5}
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["acc.json"]  # no temp file left
    (tmp_path / "sub" / "acc.json").write_text("{not json")
    assert cache.get("a") is None
    cache.put("c", 0.25)
    assert json.loads((tmp_path / "sub" / "acc.json").read_text()) == {"c": 0.25}


def test_a_run_reads_the_original_accuracy_from_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fga_search.engine._config import RunConfig
    from fga_search.engine._search import _baseline
    from fga_search.engine._setup import make_runner, prepare

    setup = prepare(RunConfig(out=str(tmp_path / "run"), device="cpu", quiet=True), log=False)
    runner = make_runner(setup)
    first = _baseline(setup, runner)
    assert first["val_acc"] == runner.evaluate(runner.model)
    assert first["test_acc"] == runner.evaluate(runner.model, split="test")
    cache = BaselineCache()
    for split, column in ((setup.data.val, "val_acc"), (setup.data.test, "test_acc")):
        key = accuracy_key(
            runner.model, split, normalization=setup.normalization.to_dict(), device=CPU, amp_dtype=runner.amp
        )
        assert cache.get(key) == first[column]

    def no_evaluation(*args: object, **kwargs: object) -> float:
        raise AssertionError("the original model was evaluated again")

    monkeypatch.setattr(runner, "evaluate", no_evaluation)
    assert _baseline(setup, runner) == first
