"""Rungs of fidelity and asynchronous multi-objective promotion (issue 29): the order on hand-made
results, ASHA's promotions, and bad rungs named."""

from __future__ import annotations

import math

import pytest

from fga_search.engine._rungs import (
    Rungs,
    RungScore,
    crowding_distance,
    next_promotion,
    promotion_order,
    promotions,
)


def test_promotion_order_sorts_fronts_then_crowding_then_infeasible() -> None:
    scores = [
        RungScore(0, accuracy=0.70, cost=0.20),  # front 1, an end (cheapest)
        RungScore(1, accuracy=0.80, cost=0.30),  # front 1, interior
        RungScore(2, accuracy=0.85, cost=0.40),  # front 1, interior, more crowded
        RungScore(3, accuracy=0.90, cost=0.50),  # front 1, an end (most accurate)
        RungScore(4, accuracy=0.75, cost=0.35),  # front 2 (dominated by 1)
        RungScore(5, accuracy=0.60, cost=0.45),  # front 3 (dominated by 1, 2 and 4)
        RungScore(6, accuracy=0.99, cost=0.90, feasible=False),  # over budget: last, however good
        RungScore(7, accuracy=0.50, cost=0.95, feasible=False),
    ]
    # crowding within front 1: plan 1 spans (0.85-0.70)/0.2 + (0.40-0.20)/0.3 = 0.75 + 0.667;
    # plan 2 spans (0.90-0.80)/0.2 + (0.50-0.30)/0.3 = 0.5 + 0.667: plan 1 is the less crowded
    assert promotion_order(scores) == [0, 3, 1, 2, 4, 5, 6, 7]


def test_identical_points_and_ties_keep_the_earlier_plan_first() -> None:
    scores = [RungScore(9, 0.8, 0.2), RungScore(4, 0.8, 0.2), RungScore(6, 0.7, 0.1)]
    assert promotion_order(scores) == [6, 9, 4]  # 4 duplicates 9 (the earlier listed): next front


def test_crowding_distance_of_a_small_front() -> None:
    assert crowding_distance([(0.5, 0.1), (0.6, 0.2)]) == [math.inf, math.inf]
    d = crowding_distance([(0.5, 0.1), (0.6, 0.2), (0.9, 0.5)])
    assert d[0] == d[2] == math.inf and d[1] == pytest.approx(1.0 + 1.0)


def test_asha_promotes_the_top_third_without_waiting_for_the_rung_to_fill() -> None:
    rung0 = [RungScore(i, accuracy=a, cost=0.2) for i, a in enumerate([0.5, 0.7])]
    assert promotions(rung0, eta=3) == []  # 2 finished: floor(2/3) = 0 may move up
    rung0.append(RungScore(2, accuracy=0.6, cost=0.2))
    assert promotions(rung0, eta=3) == [1]  # same cost: the most accurate of 3
    assert promotions(rung0, eta=3, promoted={1}) == []  # at most once
    rung0 += [RungScore(3, 0.9, 0.2), RungScore(4, 0.1, 0.2), RungScore(5, 0.2, 0.2)]
    assert promotions(rung0, eta=3, promoted={1}) == [3]  # 6 finished: the top two are 3 and 1
    infeasible = [RungScore(i, 0.9, 0.5, feasible=False) for i in range(3)]
    assert promotions(infeasible, eta=2) == []  # over budget: never promoted


def test_next_promotion_takes_the_highest_rung_first_and_none_at_the_top() -> None:
    rung0 = [RungScore(i, accuracy=0.1 * i, cost=0.2) for i in range(9)]
    rung1 = [RungScore(8, 0.9, 0.2), RungScore(7, 0.8, 0.2), RungScore(6, 0.95, 0.2)]
    rung2 = [RungScore(6, 0.96, 0.2)]
    by_rung = [rung0, rung1, rung2]
    # rung 1 has a plan to move up (6 was already): none; rung 0's top three 8, 7, 6 moved: none
    assert next_promotion(by_rung, eta=3, promoted=[{8, 7, 6}, {6}, set()]) is None
    # while 6 has not yet moved up from rung 1, it goes first (the highest rung below the top)
    assert next_promotion(by_rung, eta=3, promoted=[{8, 7, 6}, set(), set()]) == (6, 2)
    # before 6 reached rung 1: rung 1's two results earn nothing yet, so rung 0's 6 moves up
    assert next_promotion([rung0, rung1[:2], []], eta=3, promoted=[{8, 7}, set(), set()]) == (6, 1)


@pytest.mark.parametrize(
    ("text", "eta", "message"),
    [
        ("0,0.3,0.1", 3, "strictly increasing, got '0,0.3,0.1'"),
        ("0,0.1,0.1", 3, "strictly increasing"),
        ("-0.1,0.2", 3, "finite epochs >= 0, got '-0.1,0.2'"),
        ("0,inf", 3, "finite epochs >= 0"),
        ("0.5", 3, "at least two fidelities, got '0.5'"),
        ("0,a", 3, "comma-separated epochs, got '0,a'"),
        ("0,0.1", 1, "eta must be an integer >= 2, got 1"),
    ],
)
def test_bad_rungs_are_named(text: str, eta: int, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        Rungs.parse(text, eta=eta)


def test_rungs_parse() -> None:
    rungs = Rungs.parse("0,0.1,0.3,1", eta=3)
    assert rungs.epochs == (0.0, 0.1, 0.3, 1.0) and rungs.top == 3
