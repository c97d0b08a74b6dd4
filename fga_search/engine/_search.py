"""The search's entry points (``search``, ``run_search``) and its in-process executor.

``run_search`` checks every input, creates or resumes the run folder and hands its trials to the
search driver (``_driver``: the ask/tell loop over the study and all of its policy), which runs
them here, one after another (``run_in_process``), or on a Ray cluster (``_ray_backend``).
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import shutil
import signal
import sys
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, overload

from fga_search._util._storage import open_storage, redact_command, redact_url
from fga_search.runs._runfolder import RunFolder
from fga_search.train._baseline_cache import BaselineCache, accuracy_key
from fga_search.train._trial import TrialRunner

from ._config import RunConfig
from ._driver import SearchDriver, run_trial
from ._policy import SearchResult
from ._setup import SearchSetup, make_runner, prepare
from ._study import check_resumable, new_study_name

__all__ = ["SearchResult", "run_search", "search"]


@overload
def search(config: RunConfig, /, **overrides: Any) -> SearchResult: ...


@overload
def search(config: None = None, /, *, out: str, **fields: Any) -> SearchResult: ...


def search(config: RunConfig | None = None, /, **options: Any) -> SearchResult:
    """Run (or resume) a search, and return its front and best trial.

    ``search(RunConfig(out="runs/x", model="resnet56", ...))`` runs a :class:`RunConfig`'s
    settings; ``search(out="runs/x", model="resnet56", ...)`` builds one from keyword arguments
    named as its fields (the command line's options, with underscores for dashes);
    ``search(config, trials=80)`` runs a copy of ``config`` with those fields changed. An unknown
    name or a bad value raises ``ValueError`` naming it, before anything is written."""
    unknown = set(options) - set(RunConfig.field_names())
    if unknown:
        raise ValueError(
            f"unknown search option(s) {sorted(unknown)}; valid options: {RunConfig.field_names()}"
        )
    if config is None:
        if "out" not in options:
            raise TypeError("search() needs a RunConfig or out= (the run folder)")
        config = RunConfig(**options)
    elif not isinstance(config, RunConfig):
        raise TypeError(f"search() takes a RunConfig, got config={config!r}")
    elif options:
        config = dataclasses.replace(config, **options)
    return run_search(config)


@contextmanager
def _locked(folder: RunFolder) -> Iterator[None]:
    """Hold the run folder's lock; a folder this process creates is removed again (with the
    parents it created, where empty) if the run fails before its run.json is written."""
    made = []  # the folders this process creates: the run folder first, then its parents
    missing = folder.path
    while not os.path.exists(missing):
        made.append(missing)
        missing = os.path.dirname(missing)
    for path in reversed(made):
        try:
            os.mkdir(path)
        except FileExistsError:  # another process made it in between: not ours
            made.remove(path)
    with open(folder.file(".lock"), "a") as handle:  # "a": a lock held by another is left untouched
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"run folder {folder.path} is in use by another fga-search process") from None
        try:
            yield
        except BaseException:
            if folder.path in made and not folder.exists():  # nothing of a run was kept
                shutil.rmtree(folder.path, ignore_errors=True)
                for path in made[1:]:
                    try:
                        os.rmdir(path)
                    except OSError:
                        break
            raise


class _Interrupted(BaseException):  # not an Exception: run_trial fails a trial on those
    """A SIGTERM received mid-trial."""


def _raise_interrupted(signum: int, frame: types.FrameType | None) -> None:
    raise _Interrupted(signal.Signals(signum).name)


def _original_accuracy(setup: SearchSetup, runner: TrialRunner, split: str) -> float:
    """The original model's accuracy on a split, from the on-disk cache when this model and these
    images were scored before (see _baseline_cache)."""
    key = accuracy_key(
        runner.model,
        setup.data.val if split == "val" else setup.data.test,
        normalization=setup.normalization.to_dict(),
        device=runner.device,
        amp_dtype=runner.amp,
    )
    cache = BaselineCache()
    accuracy = cache.get(key)
    if accuracy is None:
        accuracy = runner.evaluate(runner.model, split=split)
        cache.put(key, accuracy)
    return accuracy


def _baseline(setup: SearchSetup, runner: TrialRunner) -> dict[str, Any]:
    p = setup.profile
    return {
        "val_acc": _original_accuracy(setup, runner, "val"),
        "test_acc": _original_accuracy(setup, runner, "test"),
        "macs": p.base_macs,
        "params": p.base_params,
        "flops_ratio": 1.0,
        "latency_ms": setup.latency.base_ms if setup.latency is not None else None,
        "latency_ratio": 1.0 if setup.latency is not None else None,
    }


def run_in_process(driver: SearchDriver, runner: TrialRunner) -> SearchResult:
    """The in-process executor: run the driver's trials one after another in this process. A
    SIGTERM or Ctrl-C mid-trial interrupts it (its plan is queued again) and ends the run."""
    while (pending := driver.next_trial()) is not None:
        old = signal.signal(signal.SIGTERM, _raise_interrupted)
        try:
            result = run_trial(runner, pending.plan, seed=pending.seed, fidelity=pending.fidelity)
        except (KeyboardInterrupt, _Interrupted):
            driver.interrupt(pending, "interrupted by the user")
            raise KeyboardInterrupt from None
        finally:
            signal.signal(signal.SIGTERM, old)
        driver.complete(pending, result)
    return driver.finish()


def create_run(setup: SearchSetup, folder: RunFolder, runner: TrialRunner) -> None:
    """Measure the original model and write run.json (a new run only)."""
    config = setup.config
    baseline = _baseline(setup, runner)
    folder.create(
        {
            "command": redact_command(sys.argv),
            "config": {**config.to_dict(), "storage": redact_url(config.storage) if config.storage else None},
            "identity": setup.identity(),
            # the study's name, which does not depend on where the folder lies (see new_study_name)
            "study_name": config.study_name or new_study_name(setup.identity()),
            "versions": setup.versions(),
            "baseline": baseline,
            "model": setup.spec.to_dict(),
            "normalization": setup.normalization.to_dict(),
            "input_shape": list(setup.data.input_shape),
            "num_classes": setup.data.num_classes,
            "classes": setup.data.classes,
            "data": setup.data.describe(),
            "space": {
                "name": setup.space.space.name,
                "source": setup.space.space.source,
                "layers": len(setup.space.layers),
            },
            "device": str(setup.device),
            "latency": _latency_record(setup),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    )
    if not config.quiet:
        print(
            f"baseline {setup.spec.name}: val accuracy {baseline['val_acc']:.4f}, test {baseline['test_acc']:.4f}, "
            f"{setup.profile.base_macs / 1e6:.2f} M MACs, {setup.profile.base_params / 1e6:.3f} M params; "
            f"searching {len(setup.space.layers)} layers on {setup.device}",
            file=sys.stderr,
        )


def _latency_record(setup: SearchSetup) -> dict[str, Any] | None:
    lat = setup.latency
    if lat is None:
        return None
    return {
        "target": lat.table.target.to_dict(),
        "target_key": lat.table.key,
        "baseline_ms": lat.base_ms,
        "baseline_p10_ms": lat.baseline.p10_ms,
        "baseline_p90_ms": lat.baseline.p90_ms,
        "rest_ms": lat.rest_ms,
        "pinned_layers": list(setup.pinned),
        "table": lat.table.path,
    }


def with_runtime(config: RunConfig, folder: RunFolder) -> RunConfig:
    """``config`` with its latency target's runtime named: the one a resumed run's table was
    measured in (eager PyTorch for a run made before runtimes existed: its table key has none),
    else the target's default (``Target.parse``), so that run.json records what was measured."""
    if config.target is None or config.target_runtime is not None:
        return config
    runtime = None
    if folder.exists():
        key = str((folder.read().get("identity") or {}).get("target") or "")
        runtime = (
            "onnxruntime" if "|onnxruntime " in key else "torchscript" if "|torchscript" in key else "eager"
        )
    target = config.latency_target()
    assert target is not None
    return dataclasses.replace(config, target_runtime=runtime or target.runtime)


def run_search(config: RunConfig) -> SearchResult:
    """Prepare (checking every input before writing anything), then run or resume the search."""
    folder = RunFolder(config.out)
    folder.check_writable()
    if folder.exists():  # before anything is written: a study that lost finished trials is refused
        check_resumable(folder, config)
    config = with_runtime(config, folder)
    setup = prepare(config, log=not config.quiet, latency_floor_check=not folder.exists())
    resuming = folder.check_new_or_matching(setup.identity())
    if config.storage is not None:  # opened before the run folder is made: a bad one writes nothing
        open_storage(config.storage)
    with _locked(folder):
        runner = make_runner(setup)
        if not resuming:
            create_run(setup, folder, runner)
        driver = SearchDriver(setup, folder, runner, backend=config.backend)
        if config.backend == "ray":
            from ._ray_backend import run_on_ray

            return run_on_ray(driver)
        return run_in_process(driver, runner)
