"""The Optuna study behind a run: its samplers."""

from __future__ import annotations

import pickle

import optuna
import pytest

from fga_search.engine._study import make_sampler


def _suggestions(sampler: optuna.samplers.BaseSampler, trials: int) -> list[tuple[int, float]]:
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    out = []
    for _ in range(trials):
        trial = study.ask()
        g, r = trial.suggest_int("g", 1, 8), trial.suggest_float("r", 0.0, 1.0)
        study.tell(trial, [g * r, g + r])
        out.append((g, r))
    return out


@pytest.mark.parametrize("name", ["nsga2", "tpe", "random"])
def test_a_sampler_survives_pickling_and_samples_as_the_original(name: str) -> None:
    """Ray Tune pickles its searcher, and with it the sampler (Optuna 5.1's NSGA-II holds a
    thread lock, which does not pickle). The copy must also sample, through its second
    generation, exactly as the original would."""
    copy = pickle.loads(pickle.dumps(make_sampler(name, seed=3, population=4, trials=12)))
    original = make_sampler(name, seed=3, population=4, trials=12)
    a, b = _suggestions(copy, 12), _suggestions(original, 12)
    assert a == b
    assert len(set(a)) == 12


def test_an_unknown_sampler_is_refused_with_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown sampler 'cmaes'; valid samplers: nsga2, tpe, random"):
        make_sampler("cmaes", seed=0, population=None, trials=4)
