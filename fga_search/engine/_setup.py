"""Everything a search needs before its first trial, checked before anything is written.

model + weights + data -> space -> profile (FLOPs) -> spectra (for repair) -> proposals.
"""

from __future__ import annotations

import copy
import math
import os
import platform
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fga_search._util._errors import first_line, shorten
from fga_search.core._flops import ModelProfile
from fga_search.core._plan import KEEP, Plan, plan_to_json
from fga_search.core._spectra import SpectralTable
from fga_search.core._surgery import apply_plan_structure
from fga_search.data._data import TRAIN_VALIDATION_WARNING, DataBundle, load_dataset, validation_flatters
from fga_search.latency import LatencyModel, LatencyTable, Target, measure_side_by_side_as_exported
from fga_search.models._loader import Normalization
from fga_search.models._zoo import ModelSpec, build_model, resolve_model
from fga_search.runs._runfolder import file_digest
from fga_search.train._evaluate import main_logits
from fga_search.train._finetune import FinetuneConfig
from fga_search.train._trial import TrialRunner, TrialSettings, resolve_device

from ._config import RunConfig
from ._cost import CostModel
from ._repair import repair
from ._space import ResolvedSpace, load_space

__all__ = ["Proposal", "SearchSetup", "prepare"]


@dataclass(frozen=True)
class Proposal:
    """A trial's plan after repair, with its analytic cost."""

    plan: Plan
    flops_ratio: float
    params_ratio: float
    macs: int
    params: int
    proposal_within_budget: bool
    within_budget: bool
    budget_ratio: float  # the plan's cost in the budget's metric (latency: the table's estimate)

    @property
    def constraint(self) -> float:
        return 0.0 if self.within_budget else 1.0

    @property
    def layers_decomposed(self) -> int:
        return sum(1 for v in self.plan.values() if v != KEEP)

    @property
    def key(self) -> str:
        return plan_to_json(dict(sorted(self.plan.items())))


@dataclass
class SearchSetup:
    config: RunConfig
    spec: ModelSpec
    model: nn.Module
    weights: str | None
    data: DataBundle
    normalization: Normalization
    space: ResolvedSpace
    profile: ModelProfile
    spectra: SpectralTable
    device: torch.device
    settings: TrialSettings
    cost: CostModel  # the budget's metric
    latency: LatencyModel | None = None
    pinned: tuple[str, ...] = ()  # layers kept dense: every FGA candidate is slower on the target
    # what the repair aims at, a ratio at most the budget: under a latency budget, the budget less
    # the table estimate's bias as the trials measured it (``_latency_aim``); None: the budget
    aim: float | None = None

    @property
    def repair_budget(self) -> float:
        return self.config.budget if self.aim is None else min(self.aim, self.config.budget)

    def propose(self, plan: Plan) -> Proposal:
        """Repair ``plan`` into the budget, or the tighter ``aim`` (analytically; no model is
        built), and price it."""
        budget, aim = self.config.budget, self.repair_budget
        plan = self.space.round_plan(plan)  # every plan's ranks on the space's rank multiples
        proposed = self.cost.ratio(plan)
        fixed = (
            plan
            if proposed <= aim + 1e-12
            else repair(plan, cost=self.cost, spectra=self.spectra, space=self.space, budget=aim)
        )
        count = self.profile.count(fixed, validate=False)
        ratio = self.cost.ratio(fixed)
        return Proposal(
            plan=fixed,
            flops_ratio=count.macs / self.profile.base_macs,
            params_ratio=count.params / self.profile.base_params,
            macs=count.macs,
            params=count.params,
            proposal_within_budget=proposed <= budget + 1e-12,
            within_budget=ratio <= budget + 1e-12,
            budget_ratio=ratio,
        )

    def identity(self) -> dict[str, Any]:
        c = self.config
        return {
            "model": self.spec.name,
            "weights_sha256": (
                "quickstart" if c.model is None else file_digest(self.weights) if self.weights else None
            ),
            "dataset": c.dataset,
            "data_dir": os.path.abspath(c.data_dir) if c.data_dir else None,
            "budget": c.budget,
            "budget_metric": c.budget_metric,
            "objective": c.objective,
            "target": self.latency.table.key if self.latency is not None else None,
            "space": self.space.space.source,
            "space_sha256": self.space.space.digest,
            "epochs": c.epochs,
            **({"rungs": c.rungs, "eta": c.eta} if c.rungs is not None else {}),
            "seed": c.seed,
            "val_fraction": c.val_fraction,
            "train_limit": c.train_limit,
            "val_limit": c.val_limit,
            "image_size": c.image_size,
            "strategy": c.strategy,
            "backend": c.backend,
            # held-out validation (issue 28): only where it is not the training split, so that the
            # identity of a run made before these options existed does not change
            **({"val_source": self.data.val_source} if self.data.val_source != "train" else {}),
            **({"val_dir": os.path.abspath(c.val_dir)} if c.val_dir else {}),
        }

    def versions(self) -> dict[str, str]:
        import optuna

        from fga_search._version import __version__

        return {
            "fga_search": __version__,
            "torch": torch.__version__,
            "optuna": optuna.__version__,
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        }


class LatencyBudgetError(ValueError):
    """A latency budget below the fastest plan's estimate; ``floor`` is that estimate (a ratio)."""

    def __init__(self, message: str, *, floor: float) -> None:
        super().__init__(message)
        self.floor = floor


def make_runner(setup: SearchSetup) -> TrialRunner:
    """The trial runner of a prepared search: its model, data, device and settings."""
    return TrialRunner(
        model=setup.model,
        data=setup.data,
        normalization=setup.normalization,
        device=setup.device,
        settings=setup.settings,
        seed=setup.config.seed,
        profile=setup.profile,
    )


def calibrate_latency(latency: LatencyModel, model: nn.Module, space: ResolvedSpace) -> Plan:
    """The space's fastest plan (each layer at its fastest option in the lookup table: dense, or a
    group count at its smallest rank), measured as a whole model side by side with the original;
    the table's estimates are calibrated on it (``LatencyModel.calibrate``). Returns the plan."""
    fastest: Plan = {
        layer.name: latency.fastest_choice(layer.name, layer.groups, layer.lowest_ranks())
        for layer in space.layers
    }
    if any(choice != KEEP for choice in fastest.values()):
        built = apply_plan_structure(copy.deepcopy(model), fastest)
        # the table holds each candidate's faster execution on a CPU: so does this measurement
        ms = measure_side_by_side_as_exported(
            {"original": model, "fastest": built},
            input_shape=latency.input_shape,
            target=latency.table.target,
        )
        latency.calibrate(fastest, latency.base_ms * ms["fastest"] / ms["original"])
    return fastest


def check_latency_budget(budget: float, latency: LatencyModel, fastest: Plan, target: Target) -> None:
    """Refuse a latency budget that no plan of the space can meet: ``fastest`` (each layer at its
    fastest option, from the lookup table) is estimated above it."""
    floor = latency.ratio(fastest)
    if floor > budget:
        if latency.rest_ms >= 0:
            why = f"everything but the convolutions takes {latency.rest_ms / latency.base_ms:.0%} of it"
        else:  # layers timed one at a time can cost more than inside the model: no share to state
            convs_ms = latency.base_ms - latency.rest_ms
            why = f"its convolutions, timed one at a time, add up to {convs_ms:.2f} ms, more than the whole model"
        dense, overhead = [name for name, choice in fastest.items() if choice == KEEP], ""
        if fastest and 2 * len(dense) >= len(fastest):  # most convs are faster dense than as any pair
            overhead = (
                f"; {len(dense)} of the {len(fastest)} searched convs run slower as any FGA pair than "
                f"dense at batch {target.batch} in {target.runtime}: the runtime's per-layer overhead, not "
                "FLOPs, sets their time. A larger --target-batch (where the deployment batches) may "
                "reach the budget, or a shallower model"
            )
        raise LatencyBudgetError(
            f"--budget {budget:g} of the latency is out of reach on {target.hardware()}: the fastest "
            f"plan of the space is estimated at {floor:.2f} of the original's {latency.base_ms:.2f} ms "
            f"({why}); use --budget {floor + 0.01:.2f} or more{overhead}",
            floor=floor,
        )


def check_cost_budget(budget: float, cost: CostModel, space: ResolvedSpace, model_name: str) -> None:
    """Refuse a FLOPs or params budget that no plan of the space can meet: with every searched
    layer at its cheapest option the model still costs more (most of its cost is elsewhere)."""
    cheapest: Plan = {}
    for layer in space.layers:
        options: list[tuple[int, int] | str] = [KEEP, *layer.lowest_ranks().items()]
        costs = [cost.layer(layer.name, choice) for choice in options]
        cheapest[layer.name] = options[costs.index(min(costs))]
    floor = cost.ratio(cheapest)
    if floor > budget:
        what = "FLOPs" if cost.metric == "flops" else "parameters"
        searched = sum(cost.layer(layer.name, KEEP) for layer in space.layers) / cost.base
        raise ValueError(
            f"--budget {budget:g} of the {what} is out of reach for model {model_name!r}: with every "
            f"searched layer at its cheapest option it keeps {floor:.3f} of the original's {what} "
            f"(the {len(space.layers)} searched convs hold {searched:.0%} of them; the rest is in "
            f"layers FGA does not decompose, such as linear layers and depthwise convs); "
            f"use --budget {math.ceil(floor * 1000) / 1000:g} or more"
        )


def check_runs(model: nn.Module, input_shape: tuple[int, ...], num_classes: int, model_name: str) -> None:
    """Refuse a model that cannot classify the data's images: it fails on them (input channels
    that do not match, images too small) or does not output (batch, classes) logits."""
    size = "x".join(str(d) for d in input_shape)
    try:
        with torch.no_grad():
            out = main_logits(copy.deepcopy(model).eval()(torch.zeros(2, *input_shape)))
    except Exception as exc:
        raise ValueError(
            f"model {model_name!r} fails on the dataset's {size} images: {shorten(first_line(exc), 200)}"
        ) from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"model {model_name!r} outputs {shape} on the dataset's {size} images, "
            f"not (batch, {num_classes}) class scores"
        )


def check_trainable(model: nn.Module, input_shape: tuple[int, ...], model_name: str) -> None:
    """Refuse a model that cannot take a training step on the data's images (fine-tuning needs
    one): e.g. Inception v3's auxiliary head on images under about 150 pixels."""
    probe = copy.deepcopy(model).train()
    try:
        out = main_logits(probe(torch.randn(2, *input_shape)))
        if out.ndim != 2:
            raise ValueError(f"its output has shape {tuple(out.shape)}, not (batch, classes)")
    except Exception as exc:
        first = first_line(exc)
        size = "x".join(str(d) for d in input_shape)
        raise ValueError(
            f"model {model_name!r} fails in training mode on {size} images (fine-tuning needs it): "
            f"{first}; use a larger --image-size, or --epochs 0"
        ) from None


def prepare(
    config: RunConfig, *, log: bool = True, latency_floor_check: bool = True, time_latency: bool = True
) -> SearchSetup:
    """Load and check the model, weights, data and space. Raises ``ValueError`` on bad input and
    writes nothing (except the caches of decoded datasets and the quickstart model).

    ``latency_floor_check=False`` skips refusing a latency budget below the fastest plan's
    estimate: for a run that exists already (its export, its resumption), whose budget was
    accepted when it was made. The estimate is a measurement, and a shared machine's speed
    drifts: the same budget can look out of reach an hour later.

    ``time_latency=False`` (an export, which needs the model, data and trial settings, not the
    target: its trials measured their latency) times nothing on the latency target and needs it
    not to be here (a run searched on a GPU exports on a CPU-only machine); the setup's trials
    then measure no latency, and its cost model prices FLOPs."""
    device = resolve_device(config.device)
    data = load_dataset(
        config.dataset,
        data_dir=config.data_dir,
        download=config.download,
        val_fraction=config.val_fraction,
        seed=config.seed if config.data_seed is None else config.data_seed,
        image_size=config.image_size,
        train_limit=config.train_limit,
        val_limit=config.val_limit,
        test_limit=config.test_limit,
        workers=config.workers,
        val_dir=config.val_dir,
        val_from=config.val_from,  # type: ignore[arg-type]  # one of VAL_FROM, checked by RunConfig
    )
    weights = config.weights
    if config.model is None:
        from ._quickstart import QUICKSTART_MODEL, quickstart_weights

        if config.dataset != "digits":
            raise ValueError("--model is required with a dataset other than digits")
        spec = resolve_model(QUICKSTART_MODEL)
        weights = quickstart_weights(data, log=log)
    else:
        spec = resolve_model(config.model)
        if weights is not None and not os.path.isfile(weights):
            raise ValueError(f"weights file not found: {weights}")
    if weights is None:  # an untrained model: the same initial weights in every process of the run
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = build_model(spec, num_classes=data.num_classes, weights=None)
    else:
        model = build_model(spec, num_classes=data.num_classes, weights=weights)
    if weights is None and log:
        print("warning: no --weights given: compressing an untrained model", file=sys.stderr)
    if log and validation_flatters(data.val_source, model=config.model, weights=config.weights):
        print(f"warning: {TRAIN_VALIDATION_WARNING}", file=sys.stderr)
    if spec.normalization is not None and len(spec.normalization.mean) != data.input_shape[0]:
        raise ValueError(
            f"model {spec.name!r} expects {len(spec.normalization.mean)}-channel images, "
            f"dataset {config.dataset!r} has {data.input_shape[0]}"
        )
    check_runs(model, tuple(data.input_shape), data.num_classes, spec.name)
    if config.epochs > 0:
        check_trainable(model, tuple(data.input_shape), spec.name)
    normalization = spec.normalization or Normalization(*data.channel_stats())
    profile = ModelProfile(model, input_shape=data.input_shape)
    chosen = config.space or spec.space
    space = load_space(chosen).resolve(profile.layers, strict=config.space is not None)
    if not space.layers:
        raise ValueError(f"space {chosen!r} leaves no layer of model {spec.name!r} to search")
    latency = None
    pinned: list[str] = []
    if config.needs_latency and time_latency:
        target = config.latency_target()
        assert target is not None
        oversubscribed = target.oversubscribed()
        if log and oversubscribed:
            print(f"warning: {oversubscribed}", file=sys.stderr)
        latency = LatencyModel(model, profile, LatencyTable(target))
        fastest = calibrate_latency(latency, model, space)
        pinned = [name for name, choice in fastest.items() if choice == KEEP]
        space = space.without(set(pinned))
        if log and pinned:
            print(
                f"latency on {target.hardware()}: {len(pinned)} layer(s) kept dense, every FGA candidate is slower",
                file=sys.stderr,
            )
        if config.budget_metric == "latency" and latency_floor_check:
            check_latency_budget(config.budget, latency, fastest, target)
    metric = "flops" if config.budget_metric == "latency" and latency is None else config.budget_metric
    cost = CostModel(profile, metric, latency=latency)
    if config.budget_metric != "latency":
        check_cost_budget(config.budget, cost, space, spec.name)
    settings = TrialSettings(
        finetune=FinetuneConfig(
            epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, compile=config.compile
        ),
        device_data_bytes=int(config.device_data_gb * 2**30),
        cudnn_benchmark=config.cudnn_benchmark,
        calibration=min(config.calibration, len(data.train)),
        recalibration=config.recalibration,
        eval_batch=512 if device.type == "cuda" else 64,
        latency_target=latency.table.target if latency is not None else None,
        latency_base_ms=latency.base_ms if latency is not None else None,
        max_latency_ratio=config.budget if config.budget_metric == "latency" else None,
    )
    return SearchSetup(
        config=config,
        spec=spec,
        model=model,
        weights=os.path.abspath(weights) if weights else None,
        data=data,
        normalization=normalization,
        space=space,
        profile=profile,
        spectra=SpectralTable(model),
        device=device,
        settings=settings,
        cost=cost,
        latency=latency,
        pinned=tuple(pinned),
    )
