from __future__ import annotations

import random

import pytest

from fga_search import KEEP, ModelProfile, build_model, search
from fga_search.core._spectra import SpectralTable
from fga_search.engine._config import RunConfig
from fga_search.engine._cost import CostModel
from fga_search.engine._setup import prepare
from fga_search.engine._space import load_space
from fga_search.engine._strategies import (
    SEARCH_SLACKS,
    alloc_label,
    alloc_slack,
    error_alloc_plan,
    grow_ranks,
    mutate_weights,
    stage_groups,
    strategy_plans,
    uniform_space_plan,
)
from helpers import rows


@pytest.fixture(scope="module")
def parts():  # type: ignore[no-untyped-def]
    model = build_model("resnet20", num_classes=10)
    profile = ModelProfile(model, input_shape=(3, 32, 32))
    space = load_space("resnet_cifar").resolve(profile.layers)
    return profile, space, CostModel(profile, "flops"), SpectralTable(model)


@pytest.mark.parametrize("groups", [1, 4, 8])
def test_uniform_plan_fits_the_budget_with_one_group_count(parts, groups: int) -> None:  # type: ignore[no-untyped-def]
    profile, space, cost, _ = parts
    plan = uniform_space_plan(space, cost, budget=0.25, groups=groups)
    assert plan is not None and 0.2 < cost.ratio(plan) <= 0.25
    assert {choice[0] for choice in plan.values()} == {groups}


def test_hand_set_stage_groups(parts) -> None:  # type: ignore[no-untyped-def]
    _, space, cost, _ = parts
    by_channels = {layer.info.in_channels: stage_groups(layer) for layer in space.layers}
    assert by_channels == {16: 4, 32: 8, 64: 8}  # group size 4 for 16 and 32 channels, 8 for 64
    plan = uniform_space_plan(space, cost, budget=0.3, groups=stage_groups)
    assert plan is not None and cost.ratio(plan) <= 0.3


@pytest.mark.parametrize("budget", [0.15, 0.3])
def test_error_alloc_minimises_the_largest_error(parts, budget: float) -> None:  # type: ignore[no-untyped-def]
    profile, space, cost, spectra = parts
    plan = error_alloc_plan(space, cost, spectra, budget=budget)
    assert plan is not None and budget * 0.93 <= cost.ratio(plan) <= budget
    worst = max(spectra.relative_error(n, *c) for n, c in plan.items() if c != KEEP)
    # every layer's error is at most the common threshold ...
    for name, choice in plan.items():
        if choice != KEEP:
            assert spectra.relative_error(name, *choice) <= worst
    # ... and a plan whose layers all stay under a clearly lower threshold costs more than the budget
    tighter = error_alloc_plan(space, cost, spectra, budget=budget * 1.3)
    assert tighter is not None
    assert max(spectra.relative_error(n, *c) for n, c in tighter.items() if c != KEEP) < worst


def test_error_alloc_weights_move_rank_between_layers(parts) -> None:  # type: ignore[no-untyped-def]
    _, space, cost, spectra = parts
    base = error_alloc_plan(space, cost, spectra, budget=0.2)
    name = space.layers[5].name
    tighter = error_alloc_plan(space, cost, spectra, budget=0.2, weights={name: 0.5})
    assert base is not None and tighter is not None
    assert spectra.relative_error(name, *tighter[name]) < spectra.relative_error(name, *base[name])
    assert cost.ratio(tighter) <= 0.2
    child = mutate_weights({}, names=[layer.name for layer in space.layers], rng=random.Random(0))
    changed = {k: v for k, v in child.items() if v != 1.0}
    assert len(changed) == 3 and set(changed.values()) <= {0.8, 1.25}


@pytest.mark.parametrize("slack", [0.05, 0.1, 0.3])
def test_error_alloc_with_slack_takes_the_most_groups_near_the_cheapest(parts, slack: float) -> None:  # type: ignore[no-untyped-def]
    from fga_search.engine._strategies import _choice, _error_table, _rank_range

    _, space, cost, spectra = parts
    base = error_alloc_plan(space, cost, spectra, budget=0.2)
    assert error_alloc_plan(space, cost, spectra, budget=0.2, slack=0.0) == base
    plan = error_alloc_plan(space, cost, spectra, budget=0.2, slack=slack)
    assert plan is not None and base is not None and 0.18 <= cost.ratio(plan) <= 0.2 and plan != base
    # each layer, at several thresholds: among the choices under the threshold that cost at most
    # (1 + slack) times the cheapest one, the one with the most groups (dense counts as most)
    changed = 0
    for layer in space.layers:
        table = _error_table(layer, spectra)
        for eps in (0.3, 0.5, 0.7, 0.9):
            options = [(cost.layer(layer.name, KEEP), KEEP)] + [
                (cost.layer(layer.name, (g, r)), (g, r))
                for g in layer.groups
                for r in range(_rank_range(layer, g)[0], _rank_range(layer, g)[1] + 1)
                if spectra.relative_error(layer.name, g, r) <= eps
            ]
            cheapest = min(c for c, _ in options)
            c0, chosen0 = _choice(layer, table, eps, cost=cost, slack=0.0)  # the cheapest (ties: any)
            assert c0 == cheapest and (c0, chosen0) in options
            near = [o for o in options if o[0] <= cheapest * (1 + slack)]
            c, chosen = _choice(layer, table, eps, cost=cost, slack=slack)
            most = max(1_000_000 if ch == KEEP else ch[0] for _, ch in near)
            assert (c, chosen) in near and (1_000_000 if chosen == KEEP else chosen[0]) == most
            assert c == min(cn for cn, ch in near if (1_000_000 if ch == KEEP else ch[0]) == most)
            changed += chosen != chosen0
    assert changed > 0  # the slack changed some choices
    with pytest.raises(ValueError, match="slack must be a finite number >= 0, got -0.1"):
        error_alloc_plan(space, cost, spectra, budget=0.2, slack=-0.1)


def test_alloc_labels_name_the_mutation_parents() -> None:
    assert alloc_label(1.0, 0.0) == "error-alloc at 100% of the budget"
    assert alloc_label(0.95, 0.05) == "error-alloc with 5% cost slack at 95% of the budget"
    assert alloc_slack(alloc_label(1.0, 0.0)) == 0.0
    assert [alloc_slack(alloc_label(1.0, s)) for s in SEARCH_SLACKS] == list(SEARCH_SLACKS)
    assert alloc_slack(alloc_label(0.95, 0.05)) is None  # below the budget: not a parent
    assert alloc_slack("uniform g=4 at 100% of the budget") is None


def test_grow_ranks_raises_three_layers_then_repair_restores_the_budget(parts) -> None:  # type: ignore[no-untyped-def]
    from fga_search.engine._repair import repair

    _, space, cost, spectra = parts
    parent = uniform_space_plan(space, cost, budget=0.2, groups=4)
    assert parent is not None
    child = grow_ranks(space, parent, rng=random.Random(1))
    changed = {n for n in parent if child[n] != parent[n]}
    assert len(changed) == 3
    for name in changed:
        (g0, r0), (g1, r1) = parent[name], child[name]
        layer = next(layer for layer in space.layers if layer.name == name)
        assert g1 == g0 and r1 == min(layer.rank_for(g0, layer.rank.high), max(r0 + 1, round(r0 * 1.25)))
    assert cost.ratio(child) > cost.ratio(parent)
    fixed = repair(child, cost=cost, spectra=spectra, space=space, budget=0.2)
    assert cost.ratio(fixed) <= 0.2 and fixed != parent
    assert grow_ranks(space, {n: KEEP for n in parent}, rng=random.Random(1)) == {n: KEEP for n in parent}


def test_strategy_plans(parts) -> None:  # type: ignore[no-untyped-def]
    _, space, cost, spectra = parts
    uniform = strategy_plans("uniform", space=space, cost=cost, spectra=spectra, budget=0.2, count=10)
    assert len(uniform) == 10 and uniform[0][0] == "uniform g=1 at 100% of the budget"
    assert all(cost.ratio(plan) <= 0.2 for _, plan in uniform)
    alloc = strategy_plans("error-alloc", space=space, cost=cost, spectra=spectra, budget=0.2, count=4)
    assert [label for label, _ in alloc] == [f"error-alloc at {p}% of the budget" for p in (100, 95, 90, 85)]
    warm = strategy_plans("search", space=space, cost=cost, spectra=spectra, budget=0.2, count=20)
    labels = [label for label, _ in warm]
    # the allocation, its 10 % slack variant, every uniform plan at the budget, the 5 % variant
    assert labels[:2] == [
        "error-alloc at 100% of the budget",
        "error-alloc with 10% cost slack at 100% of the budget",
    ]
    full = strategy_plans("uniform", space=space, cost=cost, spectra=spectra, budget=0.2, count=50)
    at_budget = {label for label, _ in full if label.endswith("at 100% of the budget")}
    n = len(at_budget)
    assert n >= 2 and set(labels[2 : 2 + n]) == at_budget
    assert labels[2 + n] == "error-alloc with 5% cost slack at 100% of the budget"
    assert {label for label in labels if label.startswith("uniform")} == at_budget
    assert any(label.startswith("blend of") for label, _ in warm)
    assert len({tuple(sorted(p.items())) for _, p in warm}) == len(warm)  # no duplicates
    assert strategy_plans("random", space=space, cost=cost, spectra=spectra, budget=0.2, count=5) == []
    with pytest.raises(ValueError, match="unknown strategy 'greedy'"):
        strategy_plans("greedy", space=space, cost=cost, spectra=spectra, budget=0.2, count=5)


@pytest.mark.slow
def test_search_is_warm_started_and_mutates(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    search(out=str(tmp_path / "run"), budget=0.3, trials=12, epochs=0.0, quiet=True)
    trials = rows(tmp_path / "run" / "trials.parquet")
    sources = [r["source"] for r in trials]
    # the uniform plan of the smallest mean weight error, from the quickstart model's own weights
    # (which depend on the torch release that trained them)
    setup = prepare(RunConfig(out=str(tmp_path / "unused"), budget=0.3, quiet=True), log=False)
    uniforms = strategy_plans(
        "uniform", space=setup.space, cost=setup.cost, spectra=setup.spectra, budget=0.3, count=50
    )
    errors = {
        label: sum(setup.spectra.relative_error(n, *c) if c != KEEP else 0.0 for n, c in plan.items())
        / len(plan)  # type: ignore[misc]
        for label, plan in uniforms
        if label.endswith("at 100% of the budget")
    }
    assert len(errors) >= 2 and len(set(errors.values())) == len(errors)
    # half of 12 trials: the allocation, its 10 % slack variant, then every uniform plan from the
    # smallest mean weight error up (as many as fit in the six)
    by_error = sorted(errors, key=errors.__getitem__)
    assert sources[:2] == [
        "error-alloc at 100% of the budget",
        "error-alloc with 10% cost slack at 100% of the budget",
    ]
    assert sources[2 : 2 + min(4, len(by_error))] == by_error[:4]
    assert any(s.startswith("mutation of trial") for s in sources[6:])
    assert any(r["within_budget"] for r in trials)
    assert all(r["flops_ratio"] <= 0.3 for r in trials if r["within_budget"])
    uniform = tmp_path / "uniform"
    search(out=str(uniform), budget=0.3, trials=5, epochs=0.0, quiet=True, strategy="uniform")
    assert [r["source"].startswith("uniform") for r in rows(uniform / "trials.parquet")] == [True] * 5


@pytest.mark.parametrize("slack", [0.0, 0.1])
def test_error_alloc_under_a_calibrated_latency_where_layer_costs_go_below_zero(
    tmp_path, monkeypatch: pytest.MonkeyPatch, slack: float
) -> None:  # type: ignore[no-untyped-def]
    """A layer's calibrated latency cost is its share of the whole-model estimate: with a scale
    over 1 (the table underestimated the savings) it can be below zero. The allocation, with or
    without a cost slack, still returns a plan within the budget."""
    from helpers import wide_cnn_latency

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model, profile, space, lat = wide_cnn_latency(lambda info, g, r: 0.02 + 0.03 * r / info.exact_rank(g))
    lat.scale = 3.0  # a pair at 0.02-0.05 ms against 0.1 dense: 0.1 + 3 * (0.02 - 0.1) < 0
    cost = CostModel(profile, "latency", latency=lat)
    assert min(cost.layer(layer.name, (1, 1)) for layer in space.layers) < 0
    cheapest = cost.ratio({layer.name: (1, 1) for layer in space.layers})
    budget = (1.0 + cheapest) / 2  # half way: the original's measured time sets the ratios
    assert cheapest < budget < 1.0
    plan = error_alloc_plan(space, cost, SpectralTable(model), budget=budget, slack=slack)
    assert plan is not None and cost.ratio(plan) <= budget
    assert any(choice != KEEP for choice in plan.values())
