"""Plans: which conv becomes which FGA pair.

A plan is a plain JSON-serialisable dict mapping a conv's module name to ``[groups, rank]`` or
to ``"keep"``. Layers a plan does not name are kept.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Union

from ._geometry import LayerInfo

__all__ = ["KEEP", "LayerChoice", "Plan", "load_plan", "normalize_plan", "plan_to_json", "validate_plan"]

KEEP = "keep"
LayerChoice = Union[tuple[int, int], str]  # noqa: UP007 (a runtime alias, Python 3.10 too)
Plan = dict[str, LayerChoice]


def _choice(name: str, value: object) -> LayerChoice:
    if value == KEEP:
        return KEEP
    if isinstance(value, Mapping):
        if set(value) != {"groups", "rank"}:
            raise ValueError(
                f"plan[{name!r}] must have exactly the keys 'groups' and 'rank', got {sorted(value)}"
            )
        value = (value["groups"], value["rank"])
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        g, r = value
        if all(isinstance(v, int) and not isinstance(v, bool) for v in (g, r)):
            return (int(g), int(r))
    raise ValueError(f"plan[{name!r}] must be [groups, rank] or 'keep', got {value!r}")


def normalize_plan(plan: Mapping[str, object]) -> Plan:
    """Check a plan's form and return it with ``(groups, rank)`` tuples."""
    if not isinstance(plan, Mapping):
        raise ValueError(f"plan must be a mapping of layer names, got {type(plan).__name__}")
    out: Plan = {}
    for name, value in plan.items():
        if not isinstance(name, str):
            raise ValueError(f"plan keys must be layer names (str), got {name!r}")
        out[name] = _choice(name, value)
    return out


def validate_plan(plan: Mapping[str, object], layers: Sequence[LayerInfo]) -> Plan:
    """Check a plan against a model's decomposable layers; raise ``ValueError`` on the first problem."""
    norm = normalize_plan(plan)
    by_name = {info.name: info for info in layers}
    for name, choice in norm.items():
        info = by_name.get(name)
        if info is None:
            valid = ", ".join(by_name) or "(none)"
            raise ValueError(f"plan names unknown layer {name!r}; decomposable Conv2d layers are: {valid}")
        if choice == KEEP:
            continue
        assert isinstance(choice, tuple)
        g, r = choice
        if g not in info.valid_groups:
            raise ValueError(
                f"layer {name!r}: groups={g} does not divide its {info.in_channels // info.base_groups} "
                f"input channels per conv group; valid group counts: {list(info.valid_groups)}"
            )
        top = info.exact_rank(g)
        if not 1 <= r <= top:
            raise ValueError(
                f"layer {name!r}: rank={r} is out of range for groups={g}; valid ranks are 1..{top}"
            )
    return norm


def plan_to_json(plan: Mapping[str, LayerChoice]) -> str:
    """Serialise a plan to a JSON string (``[groups, rank]`` lists or ``"keep"``)."""
    return json.dumps({k: (v if v == KEEP else list(v)) for k, v in plan.items()}, sort_keys=False)


def load_plan(text: str) -> Plan:
    """Parse a plan from JSON text."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"plan is not valid JSON: {exc}") from None
    return normalize_plan(data)
