"""The Ray executor: the search driver's trials run as Ray Tune trials on a (local or remote) Ray
cluster.

* Tune asks our own searcher (``_DriverSearcher``) for trials; it delegates to the search driver
  (``_driver``), which holds all of the policy, and the run's Optuna study, the only source of
  truth, as the in-process executor does. Tune's experiment state is never restored.
* The trained model and the dataset go into Ray's object store once (``tune.with_parameters``);
  each worker process builds its ``TrialRunner`` once and reuses it for later trials
  (``reuse_actors``), teacher-logit cache included.
* Each trial uses the GPU Ray assigned to it (``CUDA_VISIBLE_DEVICES``), or the CPU; trials can
  share a GPU (``--gpus-per-trial 0.5``).
* A worker killed mid-trial is retried once (``FailureConfig(max_failures=1)``), then recorded as
  failed. A killed driver is resumed by rerunning the same command: the study marks the trials it
  left running as interrupted and queues their plans again, and a new Tune experiment goes on.
* A local Ray instance listens on 127.0.0.1 only and starts no dashboard unless asked.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
from ray import tune
from ray.tune.search import ConcurrencyLimiter, Searcher

from fga_search._util._atomic import atomic_write
from fga_search._util._errors import first_line
from fga_search.core._plan import load_plan
from fga_search.data._data import DataBundle, Split
from fga_search.latency import Target
from fga_search.models._loader import Normalization
from fga_search.train._trial import TrialRunner, TrialSettings

from ._driver import PendingTrial, SearchDriver, TrialResult, run_trial
from ._policy import SearchResult
from ._rungs import Fidelity
from ._setup import SearchSetup

__all__ = ["run_on_ray"]

EXPERIMENT = "ray"
_RUNNERS: dict[str, TrialRunner] = {}  # per worker process: built once, reused across trials


@dataclass
class _Payload:
    """What every worker needs, shipped once through the object store (numpy arrays: zero-copy)."""

    key: str
    model: torch.nn.Module
    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    name: str
    classes: list[str]
    flip: bool
    crop_pad: int
    normalization: Normalization
    settings: TrialSettings
    device: str | None
    seed: int

    def bundle(self) -> DataBundle:
        def split(name: str) -> Split:
            images, labels = self.splits[name]
            return Split(torch.tensor(images), torch.tensor(labels))

        return DataBundle(
            name=self.name,
            classes=self.classes,
            train=split("train"),
            val=split("val"),
            test=split("test"),
            flip=self.flip,
            crop_pad=self.crop_pad,
        )


def _worker_device(requested: str | None) -> torch.device:
    if requested is not None and requested != "cuda" and not requested.startswith("cuda"):
        return torch.device(requested)
    if ray.get_gpu_ids() and torch.cuda.is_available():
        return torch.device("cuda:0")  # Ray restricted CUDA_VISIBLE_DEVICES to this trial's GPU(s)
    return torch.device("cpu")


def _runner(payload: _Payload) -> TrialRunner:
    device = _worker_device(payload.device)
    key = f"{payload.key}:{device}"
    if key not in _RUNNERS:
        _RUNNERS.clear()
        _RUNNERS[key] = TrialRunner(
            model=payload.model,
            data=payload.bundle(),
            normalization=payload.normalization,
            device=device,
            settings=payload.settings,
            seed=payload.seed,
        )
    return _RUNNERS[key]


def _trainable(config: dict[str, Any], payload: _Payload) -> None:
    meta = {
        "node_id": ray.get_runtime_context().get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "gpu_ids": json.dumps([str(g) for g in ray.get_gpu_ids()]),
    }
    runner = _runner(payload)
    fidelity = Fidelity(**config["fidelity"]) if config.get("fidelity") else None
    result = run_trial(runner, load_plan(config["plan"]), seed=config["seed"], fidelity=fidelity)
    metrics = {**result.metrics, "status": result.status, "device": str(runner.device), **meta}
    if result.save_model is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        result.save_model(os.path.join(folder, "model.pt"))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def _trial_name(trial: Any) -> str:
    return f"trial_{int(trial.config.get('number', -1)):05d}_{trial.trial_id}"


def trial_resources(cpus: float | None, gpus: float, target: Target | None) -> dict[str, float]:
    """What each trial asks Ray for: ``cpus`` (None: 1, or the N of a ``cpu:N`` latency target, so
    that the trials a node runs side by side leave each one the threads it times) and ``gpus``."""
    if cpus is None:
        cpus = (
            float(target.threads) if target is not None and target.device == "cpu" and target.threads else 1.0
        )
    return {"cpu": cpus, "gpu": gpus}


def latency_contention(resources: Mapping[str, float], target: Target | None) -> str | None:
    """Why trials running side by side would skew each other's latency on ``target``, or None."""
    if target is None:
        return None
    if target.device == "cpu" and target.threads and resources["cpu"] < target.threads:
        return (
            f"each trial times --target cpu:{target.threads} with {resources['cpu']:g} CPU(s) reserved: "
            "trials side by side on a node share its cores and skew each other's latency "
            f"(use --cpus-per-trial {target.threads})"
        )
    if target.device != "cpu" and 0 < resources["gpu"] < 1:
        return (
            f"trials share a GPU (--gpus-per-trial {resources['gpu']:g}): a trial's latency on "
            f"{target.device} is timed while others fine-tune on it (use --gpus-per-trial 1)"
        )
    return None


def _init_ray(setup: SearchSetup) -> None:
    """Join ``--ray-address`` or start a local instance bound to 127.0.0.1 with no dashboard."""
    c = setup.config
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")  # save experiment state at every step
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    local = c.ray_address is None
    if local:
        # Ray then takes 127.0.0.1 as the node address and binds its servers to loopback only.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        # Private API, kept: Ray reads that variable once, when ray is imported (here, or earlier
        # in the same process), into this constant, and ray.init has no public option that keeps
        # a local instance on loopback.
        import ray._private.ray_constants as constants

        constants.ENABLE_RAY_CLUSTER = False
    if ray.is_initialized():
        return
    try:
        if local:
            # address="local": always a new instance, never an existing cluster found on this machine
            ray.init(
                address="local",
                include_dashboard=c.ray_dashboard,
                log_to_driver=False,
                configure_logging=False,
            )
        else:
            ray.init(address=c.ray_address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError) as exc:
        first = first_line(exc)
        raise ValueError(
            f"cannot reach the Ray cluster at {c.ray_address or 'a local instance'}: {first}"
        ) from None


# what a trial's row keeps of the metrics its worker reported (Tune adds its own)
_ROW_METRICS = frozenset(
    {
        "val_acc", "proxy_acc", "macs", "macs_measured", "params", "finetune_steps", "latency_ms",
        "latency_ratio", "fail_reason", "within_budget", "device", "node_id", "node_ip", "gpu_ids",
    }
)  # fmt: skip


def reported_result(result: Mapping[str, Any] | None, error: bool) -> TrialResult | None:
    """A Tune trial's end as the driver's TrialResult; None for a trial stopped before it reported
    (Tune stopped it, or the driver stopped): the driver then queues it again."""
    if error:
        return TrialResult("failed", {"fail_reason": "the trial's Ray worker failed twice (retried once)"})
    if not result or "status" not in result:
        return None
    metrics = {k: v for k, v in result.items() if k in _ROW_METRICS or k.startswith("seconds_")}
    return TrialResult(str(result["status"]), metrics)


class _DriverSearcher(Searcher):  # type: ignore[misc]
    """Tune's searcher for a run: each suggestion is the driver's next trial, each end is told to
    the driver. Never saved nor restored: a killed driver resumes from the study (Tune pickles its
    searcher with the experiment; the driver is left out)."""

    def __init__(self, driver: SearchDriver) -> None:
        super().__init__()
        self.driver: SearchDriver | None = driver
        self.pending: dict[str, PendingTrial] = {}
        self.checkpoints: dict[str, tune.Checkpoint] = {}  # filled by _Checkpoints

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "driver": None, "pending": {}, "checkpoints": {}}

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True

    # Searcher.FINISHED is a str, which Ray's own annotation of suggest leaves out
    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:  # type: ignore[override]
        assert self.driver is not None
        pending = self.driver.next_trial()
        if pending is None:  # nothing more to hand out: wait for those in flight, then stop
            return Searcher.FINISHED if not self.pending else None
        self.pending[trial_id] = pending
        fidelity = dataclasses.asdict(pending.fidelity) if pending.fidelity is not None else None
        # a promotion that continues reads the weights of the rung below from the run folder:
        # on a node that does not see it, it trains its rung's epochs from the decomposed model
        return {
            "number": pending.number,
            "plan": pending.record["plan"],
            "seed": pending.seed,
            "fidelity": fidelity,
        }

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        pending = self.pending.pop(trial_id, None)
        if pending is None or self.driver is None:
            return
        checkpoint = self.checkpoints.pop(trial_id, None)
        outcome = reported_result(result, error)
        if outcome is None:
            self.driver.interrupt(pending, "interrupted: the trial stopped before it ended")
            return
        if outcome.status == "ok" and checkpoint is not None:

            def save(path: str, checkpoint: tune.Checkpoint = checkpoint) -> None:
                with checkpoint.as_directory() as folder:
                    atomic_write(path, lambda tmp: shutil.copyfile(os.path.join(folder, "model.pt"), tmp))

            outcome.save_model = save
        self.driver.complete(pending, outcome)

    def save_to_dir(self, checkpoint_dir: str, session_str: str = "default") -> None:
        """Nothing to save: the study holds the search's state."""

    def restore_from_dir(self, checkpoint_dir: str) -> None:
        raise RuntimeError("a Ray run resumes from its study, never from Tune's experiment state")


class _Checkpoints(tune.Callback):  # type: ignore[misc]
    """Hands each trial's reported checkpoint (its trained weights) to the searcher, which keeps
    a front member's in the run folder when the trial ends."""

    def __init__(self, searcher: _DriverSearcher) -> None:
        self.searcher: _DriverSearcher | None = searcher

    def __getstate__(self) -> dict[str, Any]:
        return {"searcher": None}

    def on_checkpoint(
        self, iteration: int, trials: list[Any], trial: Any, checkpoint: Any, **info: Any
    ) -> None:
        if self.searcher is not None:
            self.searcher.checkpoints[trial.trial_id] = checkpoint


@contextlib.contextmanager
def _pending_trials(count: int | None) -> Iterator[None]:
    """Let Tune keep `count` trials pending while it fits. For a custom searcher without a
    concurrency limit Tune keeps one, so with short trials and reused actors every trial ran on
    the first node; a limit would also cap the running trials, which an autoscaling cluster does
    not want. A value the user set in the environment is kept."""
    name = "TUNE_MAX_PENDING_TRIALS_PG"
    if count is None or name in os.environ:
        yield
        return
    os.environ[name] = str(count)
    try:
        yield
    finally:
        del os.environ[name]


def _slots(resources: Mapping[str, float]) -> int:
    """How many trials the cluster's resources run at once now (at least one)."""
    have = ray.cluster_resources()
    fits = [
        int(have.get(key, 0.0) / resources[unit] + 1e-9)
        for key, unit in (("CPU", "cpu"), ("GPU", "gpu"))
        if resources[unit] > 0
    ]
    return max(1, min(fits, default=1))


def _payload(setup: SearchSetup, key: str) -> _Payload:
    data = setup.data
    splits = {
        name: (getattr(data, name).images.numpy(), getattr(data, name).labels.numpy())
        for name in ("train", "val", "test")
    }
    return _Payload(
        key=f"{key}:{os.getpid()}",
        model=copy.deepcopy(setup.model).cpu(),
        splits=splits,
        **{field: getattr(data, field) for field in ("name", "classes", "flip", "crop_pad")},
        normalization=setup.normalization,
        settings=setup.settings,
        device=setup.config.device,
        seed=setup.config.seed,
    )


def run_on_ray(driver: SearchDriver) -> SearchResult:
    """Run the driver's trials as Tune trials, then end the run."""
    setup, c = driver.setup, driver.setup.config
    _init_ray(setup)
    gpus = c.gpus_per_trial
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    resources = trial_resources(c.cpus_per_trial, gpus, setup.settings.latency_target)
    contention = latency_contention(resources, setup.settings.latency_target)
    if contention is not None and not c.quiet:
        print(f"warning: {contention}", file=sys.stderr)
    storage_path = os.path.abspath(c.storage_path or driver.folder.path)
    experiment = os.path.join(storage_path, EXPERIMENT)
    if driver.wants_more():
        if os.path.exists(experiment):  # an earlier driver's: the study, not Tune's state, goes on
            aside = f"{experiment}.resumed-{time.strftime('%Y%m%d-%H%M%S')}"
            os.replace(experiment, aside)
            driver.progress.note(
                f"resuming the Ray experiment in {experiment} from the study (Tune's state moved to {aside})"
            )
        searcher = _DriverSearcher(driver)
        trainable = tune.with_parameters(_trainable, payload=_payload(setup, driver.folder.path))
        tuner = tune.Tuner(
            tune.with_resources(trainable, resources),
            tune_config=tune.TuneConfig(
                search_alg=ConcurrencyLimiter(searcher, c.max_concurrent) if c.max_concurrent else searcher,
                num_samples=-1,  # the searcher says when the run is done
                reuse_actors=True,
                trial_name_creator=_trial_name,
                trial_dirname_creator=_trial_name,
            ),
            run_config=tune.RunConfig(
                name=EXPERIMENT,
                storage_path=storage_path,
                failure_config=tune.FailureConfig(max_failures=1),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                callbacks=[_Checkpoints(searcher)],
                verbose=0,
            ),
        )
        with _pending_trials(None if c.max_concurrent else _slots(resources)):
            tuner.fit()
    return driver.finish()
