from __future__ import annotations

import json

import pytest
from torch import nn

from fga_search import KEEP, decomposable_layers, load_plan, plan_to_json
from fga_search.core._plan import normalize_plan, validate_plan


def layers():
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Conv2d(16, 16, 3))
    return decomposable_layers(model)


def test_plan_json_round_trip() -> None:
    plan = {"0": (2, 3), "1": KEEP}
    text = plan_to_json(plan)
    assert json.loads(text) == {"0": [2, 3], "1": "keep"}
    assert load_plan(text) == plan


def test_dict_form_is_accepted() -> None:
    assert normalize_plan({"0": {"groups": 4, "rank": 2}}) == {"0": (4, 2)}


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ({"0": [2]}, r"plan\['0'\] must be \[groups, rank\] or 'keep'"),
        ({"0": "dense"}, r"plan\['0'\] must be \[groups, rank\] or 'keep'"),
        ({"0": [2.0, 3]}, r"must be \[groups, rank\]"),
        ({"0": [True, 3]}, r"must be \[groups, rank\]"),
        ({"9": [1, 1]}, r"unknown layer '9'; decomposable Conv2d layers are: 0, 1"),
        (
            {"0": [3, 1]},
            r"groups=3 does not divide its 8 input channels per conv group; valid group counts: \[1, 2, 4, 8\]",
        ),
        ({"0": [2, 17]}, r"rank=17 is out of range for groups=2; valid ranks are 1..16"),
        ({"1": [16, 10]}, r"rank=10 is out of range for groups=16; valid ranks are 1..9"),
    ],
)
def test_invalid_plans(plan: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_plan(plan, layers())


def test_bad_json() -> None:
    with pytest.raises(ValueError, match="plan is not valid JSON"):
        load_plan("{")
