"""Search spaces: YAML data translated into per-layer trial suggestions.

A space file (``search_spaces/*.yaml``, shipped with the package) says which layers to skip,
which group counts to consider, the rank range as a fraction of each group's exact rank, and
per-layer overrides by name pattern. Every decomposable layer may be kept dense.

Each layer ``L`` becomes two trial parameters: ``g:L``, a categorical over ``"keep"`` and the
valid group counts, and ``r:L``, the rank fraction (a float). The space is the same for every
trial (samplers such as NSGA-II and TPE work best so), and a fraction maps to
``r = round(fraction * exact_rank(g))``, at least 1, then to the nearest multiple of the layer's
``rank_multiple`` (default 1), where its exact rank allows one: on the AVX-512 CPUs of our
benchmarks, ONNX Runtime runs an FGA pair at rank 16 10-50 % faster than at rank 15 or 17.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

from fga_search._util._errors import shorten
from fga_search.core._geometry import LayerInfo
from fga_search.core._plan import KEEP, Plan

__all__ = ["LayerSpace", "ResolvedSpace", "SearchSpace", "list_spaces", "load_space"]

MAX_SPACE_BYTES = 1 << 20
_TOP_KEYS = {"skip", "groups", "rank", "rank_multiple", "pointwise", "overrides"}
_RANK_KEYS = {"low", "high", "log"}
_OVERRIDE_KEYS = {"match", "groups", "rank", "rank_multiple", "skip"}


def _spaces_dir() -> Any:
    """The shipped spaces: package data when installed, ``search_spaces/`` in a source checkout."""
    try:
        return resources.files("fga_search.search_spaces")
    except ModuleNotFoundError:
        return resources.files("fga_search").joinpath("..", "search_spaces")


def list_spaces() -> list[str]:
    """Names of the spaces shipped with the package."""
    return sorted(p.name[:-5] for p in _spaces_dir().iterdir() if p.name.endswith(".yaml"))


@dataclass(frozen=True)
class RankRange:
    low: float
    high: float
    log: bool


@dataclass(frozen=True)
class Override:
    match: str
    groups: tuple[int, ...] | None
    rank: RankRange | None
    skip: bool
    rank_multiple: int | None = None


@dataclass(frozen=True)
class SearchSpace:
    """A parsed, validated space file (not yet tied to a model)."""

    name: str
    skip: tuple[str, ...]
    groups: tuple[int, ...]
    rank: RankRange
    pointwise: bool
    overrides: tuple[Override, ...]
    source: str
    digest: str = ""  # sha256 of the file's text: a space edited in place is another space
    rank_multiple: int = 1

    def resolve(self, layers: Sequence[LayerInfo], *, strict: bool = True) -> ResolvedSpace:
        """Tie the space to a model's decomposable layers.

        With ``strict`` (a space the user chose), a listed group count that fits no searched
        layer is an error; otherwise such counts are ignored.
        """
        out: list[LayerSpace] = []
        used_groups: set[int] = set()
        listed = set(self.groups)
        for override in self.overrides:
            listed |= set(override.groups or ())
        for info in layers:
            if info.depthwise or any(fnmatch.fnmatchcase(info.name, p) for p in self.skip):
                continue
            if not self.pointwise and info.kernel_size == (1, 1):
                continue
            ov = next((o for o in self.overrides if fnmatch.fnmatchcase(info.name, o.match)), None)
            if ov is not None and ov.skip:
                continue
            candidates = ov.groups if ov is not None and ov.groups is not None else self.groups
            rank = ov.rank if ov is not None and ov.rank is not None else self.rank
            multiple = (
                ov.rank_multiple if ov is not None and ov.rank_multiple is not None else self.rank_multiple
            )
            groups = tuple(g for g in candidates if g in info.valid_groups)
            used_groups |= set(groups)
            if groups:
                out.append(LayerSpace(info=info, groups=groups, rank=rank, rank_multiple=multiple))
        unused = sorted(listed - used_groups)
        if strict and unused and layers:
            raise ValueError(
                f"space {self.name!r}: group count(s) {unused} divide no searched layer's input channels "
                f"(channel counts: {sorted({i.in_channels // i.base_groups for i in layers})})"
            )
        return ResolvedSpace(space=self, layers=tuple(out))


@dataclass(frozen=True)
class LayerSpace:
    info: LayerInfo
    groups: tuple[int, ...]
    rank: RankRange
    rank_multiple: int = 1

    @property
    def name(self) -> str:
        return self.info.name

    def rank_for(self, groups: int, fraction: float) -> int:
        top = self.info.exact_rank(groups)
        return self.round_rank(groups, max(1, min(top, round(fraction * top))))

    def round_rank(self, groups: int, rank: int) -> int:
        """``rank`` to the nearest multiple of ``rank_multiple`` within 1..exact rank (unchanged
        where the exact rank is below the multiple)."""
        m, top = self.rank_multiple, self.info.exact_rank(groups)
        if m <= 1 or top < m:
            return rank
        return max(m, min(top - top % m, m * round(rank / m)))

    def lower_rank(self, groups: int, rank: int) -> int | None:
        """The next rank below ``rank`` the layer allows (about 10 % lower, by one at least), or None."""
        m = self.rank_multiple
        if m > 1 and self.info.exact_rank(groups) >= m:
            return rank - m if rank - m >= m else None
        return max(1, min(rank - 1, int(rank * 0.9))) if rank > 1 else None

    def lowest_ranks(self) -> dict[int, int]:
        """Each group count's smallest rank in the layer's range (its cheapest, fastest pair)."""
        return {g: self.rank_for(g, self.rank.low) for g in self.groups}

    def fraction_for(self, groups: int, rank: int) -> float:
        """A fraction in the layer's range that maps back to ``rank`` (or the nearest in range)."""
        top = self.info.exact_rank(groups)
        return min(self.rank.high, max(self.rank.low, rank / top))


@dataclass(frozen=True)
class ResolvedSpace:
    """A space tied to one model: the searched layers and their choices."""

    space: SearchSpace
    layers: tuple[LayerSpace, ...]

    def round_plan(self, plan: Plan) -> Plan:
        """``plan`` with each searched layer's rank on its ``rank_multiple``."""
        out = dict(plan)
        for layer in self.layers:
            choice = out.get(layer.name, KEEP)
            if layer.rank_multiple > 1 and choice != KEEP and not isinstance(choice, str):
                g, r = int(choice[0]), int(choice[1])
                out[layer.name] = (g, layer.round_rank(g, r))
        return out

    def without(self, names: set[str]) -> ResolvedSpace:
        """The space with these layers removed (they stay dense)."""
        return ResolvedSpace(
            space=self.space, layers=tuple(layer for layer in self.layers if layer.name not in names)
        )

    def distributions(self) -> dict[str, Any]:
        """Optuna distributions of every parameter, in a fixed order."""
        import optuna

        dists: dict[str, Any] = {}
        for layer in self.layers:
            choices: list[int | str] = [KEEP, *layer.groups]
            dists[f"g:{layer.name}"] = optuna.distributions.CategoricalDistribution(choices)
            dists[f"r:{layer.name}"] = optuna.distributions.FloatDistribution(
                layer.rank.low, layer.rank.high, log=layer.rank.log
            )
        return dists

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Ask an Optuna trial (``suggest_categorical`` / ``suggest_float``) for every parameter."""
        params: dict[str, Any] = {}
        for layer in self.layers:
            params[f"g:{layer.name}"] = trial.suggest_categorical(f"g:{layer.name}", [KEEP, *layer.groups])
            params[f"r:{layer.name}"] = trial.suggest_float(
                f"r:{layer.name}", layer.rank.low, layer.rank.high, log=layer.rank.log
            )
        return params

    def to_plan(self, params: Mapping[str, Any]) -> Plan:
        """The plan that trial parameters describe (layers outside the space are kept)."""
        plan: Plan = {}
        for layer in self.layers:
            g = params[f"g:{layer.name}"]
            if g == KEEP:
                plan[layer.name] = KEEP
            else:
                plan[layer.name] = (int(g), layer.rank_for(int(g), float(params[f"r:{layer.name}"])))
        return plan

    def to_params(self, plan: Mapping[str, Any]) -> dict[str, Any]:
        """Trial parameters that reproduce ``plan`` as closely as the space allows (for enqueuing)."""
        params: dict[str, Any] = {}
        for layer in self.layers:
            choice = plan.get(layer.name, KEEP)
            if choice == KEEP or next(iter(choice)) not in layer.groups:
                params[f"g:{layer.name}"] = KEEP
                params[f"r:{layer.name}"] = layer.rank.low
            else:
                g, r = tuple(choice)
                params[f"g:{layer.name}"] = int(g)
                params[f"r:{layer.name}"] = layer.fraction_for(int(g), int(r))
        return params


def _show(value: object) -> str:
    """A value for a message, cut short: a space file's values can be huge."""
    return shorten(repr(value), 80)


def _positive_ints(value: object, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where} must be a non-empty list of group counts, got {_show(value)}")
    for g in value:
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise ValueError(
                f"{where}: group count {_show(g)} is impossible (group counts are integers >= 1)"
            )
    return tuple(sorted(set(value)))


def _multiple(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 256:
        raise ValueError(f"{where} must be an integer from 1 to 256, got {_show(value)}")
    return value


def _rank(value: object, where: str) -> RankRange:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping with low, high and log, got {_show(value)}")
    unknown = set(value) - _RANK_KEYS
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {_show(sorted(map(str, unknown)))}; valid keys: {sorted(_RANK_KEYS)}"
        )
    low, high, log = value.get("low", 0.03), value.get("high", 0.6), value.get("log", True)
    for name, v in (("low", low), ("high", high)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1 or not math.isfinite(v):
            raise ValueError(f"{where}.{name} must be a fraction in (0, 1], got {_show(v)}")
    if low > high:
        raise ValueError(f"{where}: low ({low}) must not exceed high ({high})")
    if not isinstance(log, bool):
        raise ValueError(f"{where}.log must be true or false, got {_show(log)}")
    return RankRange(float(low), float(high), log)


def _parse(data: object, name: str, source: str) -> SearchSpace:
    if not isinstance(data, dict):
        raise ValueError(f"space {name!r} ({source}) must be a YAML mapping")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise ValueError(
            f"space {name!r}: unknown key(s) {_show(sorted(map(str, unknown)))}; valid keys: {sorted(_TOP_KEYS)}"
        )
    skip = data.get("skip", []) or []
    if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
        raise ValueError(f"space {name!r}: skip must be a list of layer-name patterns")
    pointwise = data.get("pointwise", True)
    if not isinstance(pointwise, bool):
        raise ValueError(f"space {name!r}: pointwise must be true or false, got {_show(pointwise)}")
    overrides = []
    listed = data.get("overrides", []) or []
    if not isinstance(listed, list):
        raise ValueError(f"space {name!r}: overrides must be a list of mappings, got {_show(listed)}")
    for i, ov in enumerate(listed):
        where = f"space {name!r}: overrides[{i}]"
        if not isinstance(ov, dict) or not isinstance(ov.get("match"), str):
            raise ValueError(f"{where} must be a mapping with a 'match' pattern")
        bad = set(ov) - _OVERRIDE_KEYS
        if bad:
            raise ValueError(
                f"{where}: unknown key(s) {_show(sorted(map(str, bad)))}; valid keys: {sorted(_OVERRIDE_KEYS)}"
            )
        overrides.append(
            Override(
                match=ov["match"],
                groups=_positive_ints(ov["groups"], f"{where}.groups") if "groups" in ov else None,
                rank=_rank(ov["rank"], f"{where}.rank") if "rank" in ov else None,
                skip=bool(ov.get("skip", False)),
                rank_multiple=_multiple(ov["rank_multiple"], f"{where}.rank_multiple")
                if "rank_multiple" in ov
                else None,
            )
        )
    return SearchSpace(
        name=name,
        skip=tuple(skip),
        groups=_positive_ints(data.get("groups", [1, 2, 4, 8]), f"space {name!r}: groups"),
        rank=_rank(data.get("rank", {}), f"space {name!r}: rank"),
        pointwise=pointwise,
        overrides=tuple(overrides),
        source=source,
        rank_multiple=_multiple(data.get("rank_multiple", 1), f"space {name!r}: rank_multiple"),
    )


def load_space(name_or_path: str) -> SearchSpace:
    """Load a shipped space by name (``default``, ``resnet_cifar``, ...) or a YAML file by path."""
    if name_or_path.endswith((".yaml", ".yml")) or os.sep in name_or_path:
        if not os.path.isfile(name_or_path):
            raise ValueError(f"space file not found: {name_or_path}")
        with open(name_or_path) as f:
            text = f.read()
        name, source = os.path.splitext(os.path.basename(name_or_path))[0], os.path.abspath(name_or_path)
    else:
        if name_or_path not in list_spaces():
            raise ValueError(
                f"unknown space {shorten(name_or_path)!r}; shipped spaces: {', '.join(list_spaces())}, or a path to a .yaml file"
            )
        text = _spaces_dir().joinpath(f"{name_or_path}.yaml").read_text()
        name, source = name_or_path, f"fga_search/search_spaces/{name_or_path}.yaml"
    if len(text) > MAX_SPACE_BYTES:
        raise ValueError(
            f"space {name!r} is {len(text)} characters long; a space file is at most {MAX_SPACE_BYTES}"
        )
    try:
        # aliases first, from the events alone: an alias bomb expands only when composed
        if any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, Loader=yaml.SafeLoader)):
            raise ValueError(f"space {name!r} uses YAML aliases (*name); write the values out instead")
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"space {name!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
    space = _parse(data, name, source)
    return dataclasses.replace(space, digest=hashlib.sha256(text.encode()).hexdigest())
