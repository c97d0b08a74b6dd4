from __future__ import annotations

import pytest

from fga_search._pareto import hypervolume, knee_index, pareto_mask


def test_pareto_mask() -> None:
    acc = [0.9, 0.8, 0.95, 0.7, 0.9, 0.95]
    cost = [0.5, 0.2, 0.9, 0.3, 0.5, 0.95]
    assert pareto_mask(acc, cost).tolist() == [True, True, True, False, False, False]


def test_pareto_mask_three_objectives() -> None:
    assert pareto_mask([0.9, 0.9], [0.5, 0.6], [1.0, 0.5]).tolist() == [True, True]


def test_hypervolume() -> None:
    assert hypervolume([0.5], [0.5]) == pytest.approx(0.25)
    assert hypervolume([0.5, 0.8], [0.2, 0.6]) == pytest.approx(0.5 * 0.4 + 0.8 * 0.4)
    assert hypervolume([0.5, 0.4], [0.2, 0.6]) == pytest.approx(0.5 * 0.8)  # a dominated point adds nothing
    assert hypervolume([], []) == 0.0
    assert hypervolume([0.9], [1.2]) == 0.0


def test_knee() -> None:
    acc = [0.2, 0.85, 0.9, 0.92]
    cost = [0.05, 0.1, 0.3, 0.6]
    assert knee_index(acc, cost) == 1
    assert knee_index([0.5, 0.6], [0.1, 0.2]) == 1
    with pytest.raises(ValueError):
        knee_index([], [])
