from __future__ import annotations

import itertools
import random

from fga_search import KEEP, ModelProfile, build_model
from fga_search._cost import CostModel
from fga_search._repair import repair
from fga_search._space import load_space
from fga_search._spectra import SpectralTable


def setup(name: str = "resnet20"):  # type: ignore[no-untyped-def]
    model = build_model(name, num_classes=10)
    profile = ModelProfile(model, input_shape=(3, 32, 32))
    space = load_space("resnet_cifar").resolve(profile.layers)
    return model, profile, space, SpectralTable(model)


def test_repair_brings_random_plans_within_budget() -> None:
    model, profile, space, spectra = setup()
    rng = random.Random(0)
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
            if profile.ratio(plan) <= budget:
                assert fixed == plan
            for name, choice in fixed.items():  # repair lowers ranks; it never raises one
                if plan[name] != KEEP and choice != KEEP:
                    assert choice[0] == plan[name][0] and choice[1] <= plan[name][1]


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
