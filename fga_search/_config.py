"""A search's settings, validated at the boundary."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from ._paths import check_out_path
from ._storage import check_storage_url

if TYPE_CHECKING:
    from .latency import Target

__all__ = ["BUDGET_METRICS", "SAMPLERS", "RunConfig"]

SAMPLERS = ("nsga2", "tpe", "random")
BUDGET_METRICS = ("flops", "params", "latency")
OBJECTIVES = ("accuracy,flops", "accuracy,latency", "accuracy,flops,latency")
BACKENDS = ("optuna", "ray")
MEMORY_FORMATS = (None, "nchw", "channels_last")
MAX_SEED = 2**31 - 1  # the samplers seed numpy, which takes seeds below 2**32; a run adds to its seed


def _number(value: object) -> bool:
    """A finite real number (not a bool, not NaN, not an infinity)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def needs_latency(objective: str, budget_metric: str) -> bool:
    """Whether a run with this objective and budget metric measures latency on a target."""
    return "latency" in objective or budget_metric == "latency"


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything a search run needs: the one definition of the search's options.

    Each field is the command line's option of the same name (``--budget-metric`` is
    ``budget_metric``), with the same default and the same checks: a bad value raises
    ``ValueError`` naming the option and the value when the config is made. Pass it to
    ``fga_search.search(config)``; ``run.json`` records it (``to_dict``). ``model=None`` and
    ``dataset="digits"`` is the quickstart. The fields, by group:

    * what to compress: ``model`` (zoo name, torchvision name or ``pkg.module:factory``),
      ``weights`` (a state_dict, loaded with ``weights_only=True``), ``dataset`` (digits, cifar10,
      cifar100, imagefolder), ``data_dir``, ``download``, ``image_size``;
    * the search: ``out`` (the run folder; an existing one is resumed), ``budget`` (a fraction of
      the original's cost, in (0, 1]), ``budget_metric`` (flops, params, latency), ``objective``,
      ``trials``, ``epochs`` (fine-tuning per trial), ``sampler`` (nsga2, tpe, random),
      ``population``, ``timeout`` (seconds), ``seed``, ``space`` (a shipped space or a YAML
      path), ``strategy`` (search, or a baseline: uniform, error-alloc, random), ``warm_start``;
    * latency: ``target`` (cpu, cpu:THREADS, cuda, cuda:N), ``target_batch``, ``target_dtype``,
      ``target_memory_format``, ``front_latency_runs``;
    * each trial: ``device``, ``batch_size``, ``lr``, ``compile``, ``cudnn_benchmark``,
      ``device_data_gb``, ``workers``, ``calibration``, ``recalibration``, ``val_fraction``,
      ``train_limit``, ``val_limit``, ``test_limit``;
    * the Ray backend: ``backend`` (optuna, ray), ``ray_address``, ``gpus_per_trial``,
      ``cpus_per_trial``, ``max_concurrent``, ``storage_path``, ``ray_dashboard``;
    * storage and output: ``storage`` (an Optuna RDB URL), ``study_name``, ``quiet``.

    ``fga-search --help`` describes each option at length.
    """

    out: str
    model: str | None = None
    weights: str | None = None
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    budget: float = 0.2
    budget_metric: str = "flops"
    objective: str = "accuracy,flops"
    target: str | None = None  # where latency is measured: cpu, cpu:THREADS, cuda, cuda:N
    target_batch: int = 1
    target_dtype: str = "float32"
    target_memory_format: str | None = None  # nchw or channels_last; None: channels_last on CUDA, nchw on CPU
    # without a latency target: time the front's members on this CPU after the search (0: skip)
    front_latency_runs: int = 30
    trials: int = 40
    epochs: float = 1.0
    device: str | None = None
    seed: int = 0
    sampler: str = "nsga2"
    population: int | None = None
    timeout: float | None = None
    batch_size: int = 128
    lr: float = 0.02
    workers: int = 0
    space: str | None = None
    storage: str | None = None
    study_name: str | None = None
    val_fraction: float = 0.1
    train_limit: int | None = None
    val_limit: int | None = None
    test_limit: int | None = None
    image_size: int | None = None
    compile: bool = False
    cudnn_benchmark: bool = False
    device_data_gb: float = 8.0
    calibration: int = 256
    recalibration: int = 1024
    strategy: str = "search"
    warm_start: bool = True
    backend: str = "optuna"
    ray_address: str | None = None
    gpus_per_trial: float | None = None  # None: 1 where the cluster has GPUs, else 0
    cpus_per_trial: float | None = None  # None: 1, or the N of a cpu:N latency target
    max_concurrent: int | None = None
    storage_path: str | None = None
    ray_dashboard: bool = False
    quiet: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, value: object, why: str) -> None:
            raise ValueError(f"--{name.replace('_', '-')} {why}, got {value!r}")

        if not (
            isinstance(self.budget, (int, float)) and math.isfinite(self.budget) and 0 < self.budget <= 1
        ):
            bad("budget", self.budget, "must be in (0, 1]")
        if self.budget_metric not in BUDGET_METRICS:
            bad("budget_metric", self.budget_metric, f"must be one of {', '.join(BUDGET_METRICS)}")
        if self.objective not in OBJECTIVES:
            bad("objective", self.objective, f"must be one of {', '.join(OBJECTIVES)}")
        if self.needs_latency and self.target is None:
            raise ValueError(
                "a latency objective or --budget-metric latency needs --target (e.g. cpu:2 or cuda)"
            )
        if self.target_batch < 1:
            bad("target_batch", self.target_batch, "must be >= 1")
        if self.target_memory_format not in MEMORY_FORMATS:
            bad("target_memory_format", self.target_memory_format, "must be nchw or channels_last")
        if self.target is not None:
            self.latency_target()  # the target's syntax, thread count and dtype
            if not self.needs_latency:  # it would be ignored
                raise ValueError(
                    f"--target {self.target!r} is used by a latency objective or --budget-metric latency; "
                    "add --objective accuracy,flops,latency to search and report latency on it "
                    "(without --target, the front is timed on this CPU after the search)"
                )
        elif (
            self.target_batch != 1 or self.target_dtype != "float32" or self.target_memory_format is not None
        ):
            raise ValueError(
                "--target-batch, --target-dtype and --target-memory-format need --target (e.g. cpu:2 or cuda)"
            )
        if (
            isinstance(self.front_latency_runs, bool)
            or not isinstance(self.front_latency_runs, int)
            or not (self.front_latency_runs == 0 or self.front_latency_runs >= 10)
        ):
            bad("front_latency_runs", self.front_latency_runs, "must be 0 (skip) or an integer >= 10")
        if self.trials < 1:
            bad("trials", self.trials, "must be >= 1")
        if not (_number(self.epochs) and self.epochs >= 0):
            bad("epochs", self.epochs, "must be a number >= 0")
        if self.sampler not in SAMPLERS:
            bad("sampler", self.sampler, f"must be one of {', '.join(SAMPLERS)}")
        if self.population is not None and self.population < 2:
            bad("population", self.population, "must be >= 2")
        if self.timeout is not None and not (_number(self.timeout) and self.timeout > 0):
            bad("timeout", self.timeout, "must be a number of seconds > 0")
        if self.batch_size < 1:
            bad("batch_size", self.batch_size, "must be >= 1")
        if not (_number(self.lr) and self.lr > 0):
            bad("lr", self.lr, "must be a number > 0")
        if not (_number(self.device_data_gb) and self.device_data_gb >= 0):
            bad("device_data_gb", self.device_data_gb, "must be a number >= 0")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            bad("seed", self.seed, f"must be an integer in [0, {MAX_SEED}]")
        check_out_path(self.out)
        if self.storage is not None:
            check_storage_url(self.storage)
        if self.workers < 0:
            bad("workers", self.workers, "must be >= 0")
        if not 0 < self.val_fraction < 1:
            bad("val_fraction", self.val_fraction, "must be in (0, 1)")
        for name in ("train_limit", "val_limit", "test_limit", "image_size"):
            v = getattr(self, name)
            if v is not None and v < 1:
                bad(name, v, "must be >= 1")
        if self.calibration < 1 or self.recalibration < 1:
            bad("calibration", self.calibration, "and --recalibration must be >= 1")
        if self.strategy not in ("search", "uniform", "error-alloc", "random"):
            bad("strategy", self.strategy, "must be one of search, uniform, error-alloc, random")
        if self.backend not in BACKENDS:
            bad("backend", self.backend, f"must be one of {', '.join(BACKENDS)}")
        if self.ray_address is not None and self.backend != "ray":
            raise ValueError("--ray-address needs the Ray backend (it implies --backend ray)")
        if self.gpus_per_trial is not None and not (
            0 <= self.gpus_per_trial and math.isfinite(self.gpus_per_trial)
        ):
            bad("gpus_per_trial", self.gpus_per_trial, "must be >= 0")
        if (
            self.gpus_per_trial is not None
            and self.gpus_per_trial > 1
            and self.gpus_per_trial != int(self.gpus_per_trial)
        ):
            bad("gpus_per_trial", self.gpus_per_trial, "must be a fraction <= 1 or a whole number")
        if self.cpus_per_trial is not None and not (
            self.cpus_per_trial > 0 and math.isfinite(self.cpus_per_trial)
        ):
            bad("cpus_per_trial", self.cpus_per_trial, "must be > 0")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            bad("max_concurrent", self.max_concurrent, "must be >= 1")
        if self.model is None and self.weights is not None:
            raise ValueError("--weights needs --model")

    @property
    def needs_latency(self) -> bool:
        return needs_latency(self.objective, self.budget_metric)

    def latency_target(self) -> Target | None:
        """The ``--target`` with its batch, dtype and memory format (``ValueError`` if malformed),
        or None without one."""
        if self.target is None:
            return None
        from .latency import Target

        layout = None if self.target_memory_format is None else self.target_memory_format == "channels_last"
        return Target.parse(
            self.target, batch=self.target_batch, dtype=self.target_dtype, channels_last=layout
        )

    @property
    def costs(self) -> list[str]:
        """The objective's cost columns, each minimised: flops_ratio and/or latency_ratio."""
        from ._pareto import objective_costs

        return objective_costs(self.objective)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
