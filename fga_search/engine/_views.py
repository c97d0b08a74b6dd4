"""The run folder's views, all derived from the run's Optuna study, the one source of truth.

trials.parquet holds the study's trials (``trial_row``); pareto.parquet their Pareto front by the
run's objective, with the measurements made after the search, which the study keeps as its user
attributes: each front member's test accuracy (``test_acc``) and the front's CPU latency timed
side by side with the original (``front_latency``). ``finalize`` measures what is missing and
writes them; ``rebuild_views`` (``fga-search report``) writes trials.parquet and pareto.parquet
again from the study alone. test_acc.json and front_latency.json are copies for readers without
Optuna (the export reads the latter).
"""

from __future__ import annotations

import copy
import fcntl
import os
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import optuna
import torch

from fga_search._util._errors import first_line
from fga_search.core._plan import load_plan
from fga_search.core._surgery import apply_plan_structure
from fga_search.runs._pareto import front_rows, is_finished, mark_front
from fga_search.runs._records import FrontRecord, rows_to_table, write_parquet
from fga_search.runs._runfolder import RunFolder
from fga_search.train._trial import TrialRunner

from ._policy import SearchResult, refresh_report
from ._setup import SearchSetup
from ._study import trial_row

__all__ = ["finalize", "rebuild_views", "with_cpu_latency", "write_front"]

TEST_ACC = "test_acc"  # the study's user attribute: {trial number: test accuracy} of front members
FRONT_LATENCY = "front_latency"  # the study's user attribute: front_latency.json's record, or None


def _rebuild(setup: SearchSetup, folder: RunFolder, row: dict[str, Any]) -> torch.nn.Module | None:
    path = folder.checkpoint(int(row["trial"]))
    if not os.path.isfile(path):
        return None
    model = apply_plan_structure(copy.deepcopy(setup.model).cpu(), load_plan(row["plan"]))
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def _front_cpu_latency(setup: SearchSetup, front: list[FrontRecord]) -> dict[str, Any] | None:
    """Without a latency target, time each front member and the original on this CPU (batch 1,
    float32, eager PyTorch), side by side, so that the report shows FLOPs and latency side by side
    even for a FLOPs-only search. Latency does not depend on the weights: the plans' structures
    are timed, each with the CPU execution its export would choose (``choose_cpu_execution``) and
    its batch norms folded, the original's alike (``as_deployed``). Each model runs
    ``front_latency_runs`` times (rounds of 10, side by side; 0 skips the step)."""
    runs = setup.config.front_latency_runs // 10 * 10
    if setup.latency is not None or not front or runs == 0:
        return None
    from fga_search.deploy._cpu_execution import choose_cpu_execution
    from fga_search.latency import Target, as_deployed, measure_side_by_side

    target = Target("cpu", None, 1, "float32", False)
    base = copy.deepcopy(setup.model).cpu().eval()
    models = {"original": as_deployed(base, target)}
    block_diagonal: dict[str, int] = {}
    dense: dict[str, int] = {}
    memo: dict[tuple[object, ...], str] = {}  # members share most layer geometries: time each once
    for row in front:
        member = apply_plan_structure(copy.deepcopy(base), load_plan(row["plan"])).eval()
        # as the export will run it on this CPU
        chosen = choose_cpu_execution(
            member, input_shape=setup.data.input_shape, target=target, runs=runs, memo=memo
        )
        ways = list(chosen["layers"].values())
        block_diagonal[str(row["trial"])] = ways.count("block_diagonal")
        dense[str(row["trial"])] = ways.count("dense")
        models[str(row["trial"])] = as_deployed(member, target)
    ms = measure_side_by_side(
        models, input_shape=setup.data.input_shape, target=target, rounds=runs // 10, repeats=10
    )
    return {
        "device": target.hardware(),
        "batch": 1,
        "dtype": "float32",
        "runtime": f"eager PyTorch {torch.__version__}",
        "runs": runs,
        "original_ms": ms["original"],
        "trials": {str(row["trial"]): ms[str(row["trial"])] for row in front},
        "block_diagonal_layers": block_diagonal,  # grouped convs run block-diagonal (as exported)
        "dense_layers": dense,  # pairs folded into one dense conv (as exported)
        "batch_norms": "folded into the convs before them, the original's alike (as exported)",
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def with_cpu_latency(front: list[FrontRecord], record: Mapping[str, Any] | None) -> list[FrontRecord]:
    """The front with each member's CPU latency from a ``front_latency`` record (where it has one)."""
    if not record:
        return front
    trials, original = record["trials"], record["original_ms"]
    return [
        replace(
            row, cpu_latency_ms=trials[str(row.trial)], cpu_latency_ratio=trials[str(row.trial)] / original
        )
        if str(row.trial) in trials
        else row
        for row in front
    ]


def write_front(folder: RunFolder, front: list[FrontRecord]) -> list[FrontRecord]:
    """pareto.parquet: the marked front (``mark_front``) with its CPU latency (``with_cpu_latency``)."""
    write_parquet(rows_to_table(front, FrontRecord), folder.pareto_parquet)
    return front


def finalize(
    setup: SearchSetup,
    folder: RunFolder,
    runner: TrialRunner,
    rows: list[dict[str, Any]],
    *,
    study: optuna.Study,
) -> SearchResult:
    """Measure the front's test accuracy (once per member) and its CPU latency, keep both in the
    study, mark the knee and the best (``mark_front``, by the run's objective) and write
    pareto.parquet and the report. Shared by both backends."""
    costs = setup.config.costs
    test_acc: dict[str, float] = dict(
        study.user_attrs.get(TEST_ACC) or folder.read_json("test_acc.json", {}) or {}
    )
    for row in front_rows(rows, costs=costs):
        key = str(row["trial"])
        if key not in test_acc:
            model = _rebuild(setup, folder, row)
            if model is not None:
                model = model.to(runner.device)
                if runner.channels_last:
                    model = model.to(memory_format=torch.channels_last)
                test_acc[key] = runner.evaluate(model, split="test")
    study.set_user_attr(TEST_ACC, test_acc)
    folder.write_json("test_acc.json", test_acc)
    marked = mark_front(rows, costs=costs, test_acc=test_acc)
    record = _front_cpu_latency(setup, marked)
    study.set_user_attr(FRONT_LATENCY, record)
    if record is not None:
        folder.write_json("front_latency.json", record)
    front = write_front(folder, with_cpu_latency(marked, record))
    refresh_report(folder.path)
    return SearchResult(
        run_dir=folder.path,
        trials=len(rows),
        finished=sum(1 for r in rows if is_finished(r)),
        front=front,
        best=next((r for r in front if r.is_best), None),
        baseline=folder.read().get("baseline", {}),
    )


def rebuild_views(run_dir: str) -> bool:
    """Write trials.parquet and pareto.parquet of a run folder again from its study alone (the
    report is then written from them). False, with nothing written, where there is no study to
    read here: not a run folder, no study.db and no reachable ``--storage``, or a search running
    in the folder now (it keeps the views current itself). A study that cannot be read is a
    ``ValueError``."""
    from ._config import RunConfig
    from ._study import run_study_name

    folder = RunFolder(run_dir)
    if not folder.exists():
        return False
    record = folder.read()
    settings = dict(record.get("config") or {})
    storage = settings.get("storage")
    if storage is None and not os.path.isfile(folder.study_db):
        return False
    if storage is not None and ("***" in str(storage) or str(storage).startswith("<")):
        return False  # run.json keeps the URL without its password, or hides it whole
    lock = folder.file(".lock")
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        known = {k: v for k, v in settings.items() if k in RunConfig.field_names()}
        try:
            config = RunConfig(**{**known, "out": folder.path, "quiet": True})
            name = run_study_name(folder, config)
            study = optuna.load_study(study_name=name, storage=storage or f"sqlite:///{folder.study_db}")
        except Exception as exc:  # a damaged study.db, an unknown study name, a bad run.json
            if storage is not None:  # a database not reachable from here: the views stay as they are
                return False
            raise ValueError(f"run folder {folder.path}: cannot read its study: {first_line(exc)}") from None
        rows = [trial_row(t) for t in study.get_trials(deepcopy=False)]
        write_parquet(rows_to_table(rows), folder.trials_parquet)
        if any(is_finished(r) for r in rows):
            attrs = study.user_attrs
            test_acc = attrs.get(TEST_ACC) or folder.read_json("test_acc.json", {}) or {}
            latency = (
                attrs[FRONT_LATENCY]
                if FRONT_LATENCY in attrs
                else folder.read_json("front_latency.json", None)
            )
            write_front(
                folder, with_cpu_latency(mark_front(rows, costs=config.costs, test_acc=test_acc), latency)
            )
    return True
