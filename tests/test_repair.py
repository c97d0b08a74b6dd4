from __future__ import annotations

import itertools
import random

import pytest

from fga_search import KEEP, ModelProfile, build_model
from fga_search.core._spectra import SpectralTable
from fga_search.engine._cost import CostModel
from fga_search.engine._repair import repair
from fga_search.engine._space import load_space


def setup(name: str = "resnet20"):  # type: ignore[no-untyped-def]
    model = build_model(name, num_classes=10)
    profile = ModelProfile(model, input_shape=(3, 32, 32))
    space = load_space("resnet_cifar").resolve(profile.layers)
    return model, profile, space, SpectralTable(model)


def test_repair_brings_random_plans_within_budget() -> None:
    model, profile, space, spectra = setup()
    rng = random.Random(0)
    compared = 0
    for budget in (0.1, 0.2, 0.5):
        for _ in range(10):
            plan = {}
            for layer in space.layers:
                g = rng.choice((KEEP, *layer.groups))
                plan[layer.name] = KEEP if g == KEEP else (g, layer.rank_for(g, rng.uniform(0.05, 1.0)))
            fixed = repair(
                plan, cost=CostModel(profile, "flops"), spectra=spectra, space=space, budget=budget
            )
            assert profile.ratio(fixed) <= budget
            # a plan within its budget is left as it is: none of these random plans is (the former
            # `if ratio(plan) <= budget: assert fixed == plan` never ran), the repaired one is
            assert profile.ratio(plan) > budget
            again = repair(
                fixed, cost=CostModel(profile, "flops"), spectra=spectra, space=space, budget=budget
            )
            assert again == fixed
            for name, choice in fixed.items():  # repair lowers ranks; it never raises one
                if plan[name] != KEEP and choice != KEEP:
                    assert choice[0] == plan[name][0] and choice[1] <= plan[name][1]
                    compared += 1
    assert compared >= 400  # layers factored both before and after repair over the 30 plans (451)


def test_repair_prefers_cheap_error() -> None:
    model, profile, space, spectra = setup()
    plan = {layer.name: (1, layer.info.exact_rank(1)) for layer in space.layers}
    fixed = repair(plan, cost=CostModel(profile, "flops"), spectra=spectra, space=space, budget=0.3)
    assert 0.28 <= profile.ratio(fixed) <= 0.3
    errors = [spectra.relative_error(n, g, r) for n, (g, r) in fixed.items()]
    assert max(errors) < 0.9


def test_repair_decomposes_kept_layers_when_needed() -> None:
    model, profile, space, spectra = setup()
    plan = {layer.name: KEEP for layer in space.layers}
    fixed = repair(plan, cost=CostModel(profile, "flops"), spectra=spectra, space=space, budget=0.2)
    assert profile.ratio(fixed) <= 0.2
    assert any(choice != KEEP for choice in fixed.values())


def test_spectral_errors_are_monotone() -> None:
    model, profile, space, spectra = setup()
    e = spectra.error2("layer2.0.conv1", 4)
    assert e[0] == 1.0 and abs(e[-1]) < 1e-12
    assert all(a >= b for a, b in itertools.pairwise(e))


def test_latency_repair_switches_layers_whose_pairs_are_slower_at_any_rank(
    tmp_path,
    monkeypatch,  # type: ignore[no-untyped-def]
) -> None:
    """A table (as read from disk) where every grouped pair is slower than the dense conv at any
    rank and g = 1 is faster: lowering ranks cannot meet a budget under the original's latency;
    switching layers to g = 1 (or dense) can."""
    from helpers import wide_cnn_latency

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model, profile, space, lat = wide_cnn_latency(lambda info, g, r: (0.05 if g == 1 else 0.2) + 1e-4 * r)
    cost = CostModel(profile, "latency", latency=lat)
    searched = [layer for layer in space.layers if max(layer.groups) > 1]
    assert len(searched) >= 2
    slow = {layer.name: (max(layer.groups), layer.info.exact_rank(max(layer.groups))) for layer in searched}
    assert cost.ratio(slow) > 1.0
    rank_one = {name: (g, 1) for name, (g, _) in slow.items()}
    assert cost.ratio(rank_one) > 1.0  # lowering ranks alone cannot get under the original
    fixed = repair(slow, cost=cost, spectra=SpectralTable(model), space=space, budget=1.0)
    assert cost.ratio(fixed) <= 1.0
    switched = [name for name, choice in fixed.items() if choice == KEEP or choice[0] == 1]
    assert switched  # at least one layer left its slow grouped pair


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_latency_repair_aims_at_the_calibrated_estimate(tmp_path, monkeypatch, scale: float) -> None:  # type: ignore[no-untyped-def]
    """With the table's changes scaled (calibrated on a measured plan), the repair prices its
    moves with the same scale as the estimate it must bring within budget: the repaired plan's
    estimate fits, and the plan is the one the unscaled table gives at the equivalent budget."""
    from helpers import wide_cnn_latency

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model, profile, space, lat = wide_cnn_latency(lambda info, g, r: 0.02 + 0.06 * r / info.exact_rank(g))
    cost = CostModel(profile, "latency", latency=lat)
    spectra = SpectralTable(model)
    full = {layer.name: (1, layer.info.exact_rank(1)) for layer in space.layers}
    change = cost.ratio(full) - 1.0  # the unscaled table's change of the full-rank plan
    assert change < 0
    budget = 1.0 + 2 * change * scale  # twice the full-rank plan's change, as the scaled table sees it
    lat.scale = scale
    fixed = repair(full, cost=cost, spectra=spectra, space=space, budget=budget)
    assert fixed != full and cost.ratio(fixed) <= budget + 1e-12
    lat.scale = 1.0
    assert fixed == repair(full, cost=cost, spectra=spectra, space=space, budget=1.0 + (budget - 1.0) / scale)
