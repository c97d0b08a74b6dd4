"""RunConfig's checks at the boundary: each bad value is a ``ValueError`` that names the option
and the value (``check``, which ``RunConfig.__post_init__`` runs)."""

from __future__ import annotations

import math
from dataclasses import fields
from typing import TYPE_CHECKING

from fga_search._util._paths import check_out_path
from fga_search._util._storage import check_storage_url

from ._option import option_of

if TYPE_CHECKING:
    from ._config import RunConfig

__all__ = ["MAX_SEED", "check"]

MAX_SEED = 2**31 - 1  # the samplers seed numpy, which takes seeds below 2**32; a run adds to its seed


def _number(value: object) -> bool:
    """A finite real number (not a bool, not NaN, not an infinity)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check(config: RunConfig) -> None:
    """Refuse a bad value, naming its option (``--budget-metric``) and the value. Sets
    ``epochs`` to the top rung's with ``--rungs``."""

    def bad(name: str, value: object, why: str) -> None:
        raise ValueError(f"--{name.replace('_', '-')} {why}, got {value!r}")

    if not (
        isinstance(config.budget, (int, float)) and math.isfinite(config.budget) and 0 < config.budget <= 1
    ):
        bad("budget", config.budget, "must be in (0, 1]")
    for f in fields(config):  # the options with a list of choices (None: the default's "unset")
        cli = option_of(f)
        value = getattr(config, f.name)
        if cli is not None and cli.choices is not None and value not in cli.choices:
            if not (value is None and f.default is None):
                bad(f.name, value, f"must be one of {', '.join(cli.choices)}")
    if config.needs_latency and config.target is None:
        raise ValueError("a latency objective or --budget-metric latency needs --target (e.g. cpu:2 or cuda)")
    if config.target_batch < 1:
        bad("target_batch", config.target_batch, "must be >= 1")
    if config.target is not None:
        config.latency_target()  # the target's syntax, thread count and dtype
        if not config.needs_latency:  # it would be ignored
            raise ValueError(
                f"--target {config.target!r} is used by a latency objective or --budget-metric latency; "
                "add --objective accuracy,flops,latency to search and report latency on it "
                "(without --target, the front is timed on this CPU after the search)"
            )
    elif any(
        getattr(config, f.name) != f.default
        for f in fields(config)
        if f.name in ("target_batch", "target_dtype", "target_memory_format", "target_runtime")
    ):
        raise ValueError(
            "--target-batch, --target-dtype, --target-memory-format and --target-runtime need --target "
            "(e.g. cpu:2 or cuda)"
        )
    if (
        isinstance(config.front_latency_runs, bool)
        or not isinstance(config.front_latency_runs, int)
        or not (config.front_latency_runs == 0 or config.front_latency_runs >= 10)
    ):
        bad("front_latency_runs", config.front_latency_runs, "must be 0 (skip) or an integer >= 10")
    if config.val_dir is not None and config.val_from is not None:
        raise ValueError(
            f"--val-dir and --val-from exclude each other, got --val-dir {config.val_dir!r} "
            f"and --val-from {config.val_from!r}"
        )
    if config.trials < 1:
        bad("trials", config.trials, "must be >= 1")
    if not (_number(config.epochs) and config.epochs >= 0):
        bad("epochs", config.epochs, "must be a number >= 0")
    rungs = config.rung_schedule()  # ValueError naming --rungs or --eta
    if rungs is not None:
        if config.epochs not in (1.0, rungs.epochs[-1]):  # 1.0: the default, left unset
            raise ValueError(f"--rungs gives each rung's fine-tuning epochs: drop --epochs {config.epochs:g}")
        object.__setattr__(config, "epochs", rungs.epochs[-1])  # a trial's most: the top rung's
    elif any(getattr(config, f.name) != f.default for f in fields(config) if f.name in ("eta", "promote")):
        raise ValueError("--eta and --promote need --rungs (e.g. --rungs 0,0.1,0.3)")
    if config.population is not None and config.population < 2:
        bad("population", config.population, "must be >= 2")
    if config.timeout is not None and not (_number(config.timeout) and config.timeout > 0):
        bad("timeout", config.timeout, "must be a number of seconds > 0")
    if config.batch_size < 1:
        bad("batch_size", config.batch_size, "must be >= 1")
    if not (_number(config.lr) and config.lr > 0):
        bad("lr", config.lr, "must be a number > 0")
    if not (_number(config.device_data_gb) and config.device_data_gb >= 0):
        bad("device_data_gb", config.device_data_gb, "must be a number >= 0")
    if isinstance(config.seed, bool) or not isinstance(config.seed, int) or not 0 <= config.seed <= MAX_SEED:
        bad("seed", config.seed, f"must be an integer in [0, {MAX_SEED}]")
    check_out_path(config.out)
    if config.storage is not None:
        check_storage_url(config.storage)
    if config.workers < 0:
        bad("workers", config.workers, "must be >= 0")
    if not 0 < config.val_fraction < 1:
        bad("val_fraction", config.val_fraction, "must be in (0, 1)")
    for name in ("train_limit", "val_limit", "test_limit", "image_size"):
        v = getattr(config, name)
        if v is not None and v < 1:
            bad(name, v, "must be >= 1")
    if config.calibration < 1 or config.recalibration < 1:
        bad("calibration", config.calibration, "and --recalibration must be >= 1")
    if config.ray_address is not None and config.backend != "ray":
        raise ValueError("--ray-address needs the Ray backend (it implies --backend ray)")
    if config.gpus_per_trial is not None and not (
        0 <= config.gpus_per_trial and math.isfinite(config.gpus_per_trial)
    ):
        bad("gpus_per_trial", config.gpus_per_trial, "must be >= 0")
    if (
        config.gpus_per_trial is not None
        and config.gpus_per_trial > 1
        and config.gpus_per_trial != int(config.gpus_per_trial)
    ):
        bad("gpus_per_trial", config.gpus_per_trial, "must be a fraction <= 1 or a whole number")
    if config.cpus_per_trial is not None and not (
        config.cpus_per_trial > 0 and math.isfinite(config.cpus_per_trial)
    ):
        bad("cpus_per_trial", config.cpus_per_trial, "must be > 0")
    if config.max_concurrent is not None and config.max_concurrent < 1:
        bad("max_concurrent", config.max_concurrent, "must be >= 1")
    if config.model is None and config.weights is not None:
        raise ValueError("--weights needs --model")
