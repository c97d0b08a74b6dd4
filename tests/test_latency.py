from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from torch import nn

from fga_search import KEEP, FGAConv2d, ModelProfile, decomposable_layers, search
from fga_search.latency import (
    LatencyModel,
    LatencyTable,
    Target,
    cpu_cores,
    measure_latency,
)
from fga_search.latency._latency_table import MIN_CALIBRATION_CHANGE
from helpers import rows, run_cli, wide_cnn


def test_target_parsing_and_validation() -> None:
    # ONNX Runtime is the CPU default where it is installed (it is a dependency); eager on CUDA
    assert Target.parse("cpu:2") == Target("cpu", 2, 1, "float32", False, "onnxruntime")
    assert Target.parse("cpu:2", runtime="eager") == Target("cpu", 2, 1, "float32", False)
    assert Target.parse("cpu", dtype="bf16").runtime == "eager"  # ONNX Runtime runs float32 here
    assert Target.parse("cuda").runtime == "eager"
    with pytest.raises(ValueError, match="target runtime must be one of eager, onnxruntime, torchscript"):
        Target("cpu", runtime="tvm")
    assert Target.parse("cpu", batch=4, dtype="bf16").batch == 4
    assert Target.parse("cuda", dtype="bf16").channels_last is True
    for spec, message in (
        ("tpu", "use cpu, cpu:THREADS"),
        ("cpu:two", "needs a thread count"),
        ("cuda:x", "needs a device index"),
    ):
        with pytest.raises(ValueError, match=message):
            Target.parse(spec)
    with pytest.raises(ValueError, match="target dtype must be one of float32, bf16, fp16"):
        Target("cpu", dtype="int8")
    key = Target.parse("cpu:2", runtime="eager").key()
    assert "(2 threads)" in key and "float32" in key and "batch 1" in key and "nchw" in key
    assert "onnxruntime" not in key and "torchscript" not in key  # tables made before runtimes keep theirs
    import onnxruntime

    assert Target.parse("cpu:2").key() == f"{key}|onnxruntime {onnxruntime.__version__}"
    assert Target.parse("cpu:2", runtime="torchscript").key() == f"{key}|torchscript"


def test_the_latency_table_is_keyed_by_runtime(tmp_path: Path) -> None:
    """Each runtime has its own table file and entries: one runtime's timings never price another's."""
    paths = {
        rt: LatencyTable(Target.parse("cpu:1", runtime=rt)).path
        for rt in ("eager", "onnxruntime", "torchscript")
    }
    assert len(set(paths.values())) == 3
    layer = nn.Conv2d(8, 8, 3, padding=1)
    info = decomposable_layers(nn.Sequential(layer))[0]
    ms = {}
    for rt in ("eager", "onnxruntime"):
        table = LatencyTable(
            Target.parse("cpu:1", runtime=rt), path=str(tmp_path / f"{rt}.json"), repeats=5, warmup=1
        )
        ms[rt] = table.measure(info, (8, 8), KEEP)
        assert ms[rt] > 0 and table.measured == 1
        assert json.loads((tmp_path / f"{rt}.json").read_text())["target"] == table.key
    again = LatencyTable(Target.parse("cpu:1", runtime="eager"), path=str(tmp_path / "onnxruntime.json"))
    assert again.entries == {}  # the ONNX Runtime table's file is not read for an eager target


def test_onnxruntime_missing_is_refused_by_name_and_not_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now fails
    assert Target.parse("cpu:2").runtime == "eager"
    with pytest.raises(ValueError, match="target runtime onnxruntime needs the onnxruntime package"):
        Target.parse("cpu:2", runtime="onnxruntime")
    from fga_search._cli import main

    out = tmp_path / "run"
    code = main(["--budget-metric", "latency", "--target", "cpu:2", "--target-runtime", "onnxruntime",
                 "--trials", "1", "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "needs the onnxruntime package" in err, err
    assert "Traceback" not in err and not out.exists()
    with pytest.raises(ValueError, match="'cpu:0': cpu:THREADS needs at least 1 thread"):
        Target.parse("cpu:0")


def test_a_cpu_target_with_more_threads_than_cores_is_named_oversubscribed() -> None:
    cores = cpu_cores()
    assert cores >= 1
    for spec in (f"cpu:{cores}", "cpu", "cuda"):
        assert Target.parse(spec).oversubscribed() is None, spec
    assert Target.parse(f"cpu:{cores + 1}").oversubscribed() == (
        f"--target cpu:{cores + 1} asks for {cores + 1} threads, but this process has {cores} core(s): "
        "latencies are measured oversubscribed"
    )


def test_measure_latency_reports_medians() -> None:
    stats = measure_latency(
        nn.Conv2d(8, 8, 3), input_shape=(8, 16, 16), target=Target.parse("cpu:1"), warmup=2, repeats=7
    )
    assert stats.runs == 7 and 0 < stats.p10_ms <= stats.median_ms <= stats.p90_ms


def layers():  # type: ignore[no-untyped-def]
    model = nn.Sequential(
        nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 32, 3, stride=2)
    )
    return model, decomposable_layers(model)


def test_timing_leaves_the_global_rng_alone() -> None:
    """A trial's latency is timed before it fine-tunes: the timing must not move the RNG that the
    fine-tuning's dropout draws from, so that a trial re-run without timing (an export) trains alike."""
    import torch

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.5))
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    measure_latency(model, input_shape=(3, 8, 8), target=Target.parse("cpu:1"), warmup=1, repeats=2)
    torch.testing.assert_close(torch.rand(3), expected)


def test_table_keys_share_geometry_and_persist(tmp_path: Path) -> None:
    model, infos = layers()
    path = str(tmp_path / "table.json")
    table = LatencyTable(Target.parse("cpu:1"), path=path, repeats=3, warmup=1)
    a = table.measure(infos[0], (12, 12), "keep")
    b = table.measure(infos[1], (12, 12), "keep")  # same geometry, another layer: one measurement
    assert a == b and table.measured == 1
    table.measure(infos[0], (12, 12), (2, 4))
    table.measure(infos[0], (10, 10), (2, 4))  # another input size is another key
    table.measure(infos[2], (12, 12), (2, 4))  # another geometry
    assert table.measured == 4 and len(table.entries) == 4
    # on a CPU, a candidate's entry is the faster of its grouped and block-diagonal executions
    assert any("c16-n32-k3x3-s2x2" in key and key.endswith("|g2-r4-fastest") for key in table.entries)
    again = LatencyTable(Target.parse("cpu:1"), path=path, repeats=3, warmup=1)
    assert again.entries == table.entries
    assert again.measure(infos[1], (12, 12), "keep") == a and again.measured == 0  # read, not measured
    data = json.loads(Path(path).read_text())
    assert data["target"] == Target.parse("cpu:1").key()


def test_table_of_another_device_is_not_used(tmp_path: Path) -> None:
    model, infos = layers()
    path = tmp_path / "table.json"
    table = LatencyTable(Target.parse("cpu:1"), path=str(path), repeats=3, warmup=1)
    table.measure(infos[0], (12, 12), "keep")
    data = json.loads(path.read_text())
    data["target"] = data["target"].replace("(1 threads)", "(64 threads)")  # as if written on another machine
    data["entries"] = {k: 123.0 for k in data["entries"]}
    path.write_text(json.dumps(data))
    fresh = LatencyTable(Target.parse("cpu:1"), path=str(path), repeats=3, warmup=1)
    assert fresh.entries == {}
    assert fresh.measure(infos[0], (12, 12), "keep") != 123.0 and fresh.measured == 1
    other_dtype = LatencyTable(Target.parse("cpu:1", dtype="bf16"), path=str(path))
    assert other_dtype.entries == {} and other_dtype.key != fresh.key


def test_estimates_interpolate_between_anchor_ranks(tmp_path: Path) -> None:
    model, infos = layers()
    table = LatencyTable(Target.parse("cpu:1"), path=str(tmp_path / "t.json"), repeats=3, warmup=1)
    top = infos[0].exact_rank(1)  # 16
    lo, hi = table.measure(infos[0], (12, 12), (1, 4)), table.measure(infos[0], (12, 12), (1, 8))
    mid = table.estimate(infos[0], (12, 12), (1, 6))  # between the anchors 4 (top/4) and 8 (top/2)
    assert top == 16 and min(lo, hi) <= mid <= max(lo, hi)
    assert table.entry_key(infos[0], (12, 12), (1, 6)) not in table.entries  # interpolated, not measured


@pytest.fixture
def wide_latency(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LatencyModel:
    """The latency model of ``wide_cnn`` on one CPU thread, with a table in a fresh cache folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model = wide_cnn()
    profile = ModelProfile(model, input_shape=(1, 8, 8))
    return LatencyModel(model, profile, LatencyTable(Target.parse("cpu:1"), repeats=3, warmup=1), repeats=5)


def test_latency_model_estimate_of_the_original_is_its_measurement(wide_latency: LatencyModel) -> None:
    lat = wide_latency
    assert lat.estimate_ms({}) == pytest.approx(lat.base_ms)
    assert lat.ratio({"0": "keep"}) == pytest.approx(1.0)
    assert set(lat.dense) == {"0", "3", "6"}


def test_calibration_fits_the_estimates_to_one_measured_plan(
    wide_latency: LatencyModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    lat = wide_latency
    both = {"3": (1, 2), "6": (1, 2)}
    one = {"3": (1, 2)}
    for name in both:  # pinned timings: each pair saves 30 % of the original's time in the table
        info = lat.profile.by_name[name]
        key = lat.table.entry_key(info, lat.profile.in_hw[name], (1, 2))
        lat.table.entries[key] = lat.dense[name] - 0.3 * lat.base_ms
    raw_both, raw_one = lat.estimate_ms(both) - lat.base_ms, lat.estimate_ms(one) - lat.base_ms
    assert raw_both == pytest.approx(-0.6 * lat.base_ms) and raw_one == pytest.approx(-0.3 * lat.base_ms)
    assert abs(raw_both) >= MIN_CALIBRATION_CHANGE * lat.base_ms  # a change worth calibrating on
    measured = lat.base_ms + 0.5 * raw_both  # the whole model changes half as much as the table says
    assert lat.calibrate(both, measured) == pytest.approx(0.5)
    assert lat.estimate_ms(both) == pytest.approx(measured)
    assert lat.estimate_ms(one) == pytest.approx(lat.base_ms + 0.5 * raw_one)
    assert lat.estimate_ms({}) == pytest.approx(lat.base_ms)
    # a measurement that contradicts the table's sign leaves the estimates alone
    assert lat.calibrate(both, lat.base_ms - 2 * raw_both) == 1.0
    assert lat.estimate_ms(both) == pytest.approx(lat.base_ms + raw_both)
    with pytest.raises(ValueError, match="measured_ms must be positive, got 0"):
        lat.calibrate(both, 0.0)
    # a plan that changes the estimate by less than the threshold, in the table and as measured,
    # is too noisy to calibrate on
    monkeypatch.setattr(
        "fga_search.latency._latency_table.MIN_CALIBRATION_CHANGE", 2 * abs(raw_both) / lat.base_ms
    )
    assert lat.calibrate(both, lat.base_ms + 0.5 * raw_both) == 1.0
    assert lat.estimate_ms(both) == pytest.approx(lat.base_ms + raw_both)
    # ... but a measured change over the threshold calibrates even a small table change: a table
    # timed while the machine ran faster than it does now
    monkeypatch.setattr(
        "fga_search.latency._latency_table.MIN_CALIBRATION_CHANGE", 1.4 * abs(raw_both) / lat.base_ms
    )
    now = lat.base_ms + 3 * raw_both / 2  # -0.9 of the original: over the threshold of 0.84
    assert lat.calibrate(both, now) == pytest.approx(1.5)
    assert lat.estimate_ms(both) == pytest.approx(now)
    assert lat.ratio(one) == pytest.approx(1 + 1.5 * raw_one / lat.base_ms)
    monkeypatch.setattr(
        "fga_search.latency._latency_table.MIN_CALIBRATION_CHANGE", 1.6 * abs(raw_both) / lat.base_ms
    )
    assert lat.calibrate(both, now) == 1.0  # both changes under the threshold of 0.96


@pytest.mark.slow
def test_latency_search_on_cpu_with_a_tiny_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    run = tmp_path / "run"
    result = search(
        out=str(run),
        model="helpers:wide_cnn",
        dataset="digits",
        budget=0.9,
        budget_metric="latency",
        objective="accuracy,flops,latency",
        target="cpu:2",
        target_batch=8,
        trials=8,
        epochs=0.5,
        quiet=True,
    )
    record = json.loads((run / "run.json").read_text())
    lat = record["latency"]
    assert lat["baseline_ms"] > 0 and "batch 8" in lat["target_key"]
    assert record["baseline"]["latency_ratio"] == 1.0
    assert isinstance(lat["pinned_layers"], list)
    trials = rows(run / "trials.parquet")
    assert len(trials) == 8
    tuned = [r for r in trials if (r["finetune_steps"] or 0) > 0]
    assert tuned, [(r["status"], r["latency_ratio"]) for r in trials]  # the budget is within reach
    for r in tuned:  # measured on the built model before fine-tuning; never over the budget
        assert r["latency_ms"] > 0 and r["latency_ratio"] <= 0.9
        assert r["latency_estimate_ratio"] is not None
    for r in trials:
        if r["status"] == "infeasible" and r["latency_ratio"] is not None:
            assert r["latency_ratio"] > 0.9 and (r["finetune_steps"] or 0) == 0
    front = rows(run / "pareto.parquet")
    assert front and len(front) == len(result.front)
    assert all(r["latency_ratio"] is not None for r in front)
    html = (run / "report.html").read_text()
    assert "Latency on the target" in html and f"{len(lat['pinned_layers'])} layer(s) are kept dense" in html
    assert result.front[0]["latency_ratio"] <= 0.9

    # the machine drifts: the same budget now looks out of reach; the run exports and resumes anyway
    from fga_search import export
    from fga_search.engine._setup import LatencyBudgetError

    def refuse(*_: object) -> None:
        raise LatencyBudgetError("--budget 0.9 of the latency is out of reach", floor=0.95)

    monkeypatch.setattr("fga_search.engine._setup.check_latency_budget", refuse)
    again = search(out=str(run), model="helpers:wide_cnn", dataset="digits", budget=0.9, budget_metric="latency",
                   objective="accuracy,flops,latency", target="cpu:2", target_batch=8, trials=8, epochs=0.5, quiet=True)  # fmt: skip
    assert again.finished == 8 and len(rows(run / "trials.parquet")) == 8  # resumed: nothing to do
    assert result.best is not None and result.best["latency_ratio"] <= 0.9
    exported = export(str(run), pick="best", out=str(tmp_path / "export"), latency_runs=0, formats=("onnx",))
    assert exported.spec["plan"] == json.loads(result.best["plan"])
    # the search timed in ONNX Runtime (the CPU default) the ONNX model that the export writes:
    # the best trial's model, exported the way the latency runner does, gives model.onnx's outputs
    assert record["config"]["target_runtime"] == "onnxruntime" and "|onnxruntime " in lat["target_key"]
    import onnxruntime
    import torch

    from fga_search.core._plan import load_plan
    from fga_search.core._surgery import apply_plan_structure
    from fga_search.latency import as_deployed
    from fga_search.latency._runtimes import onnx_bytes, onnx_session

    best = result.best
    model = apply_plan_structure(wide_cnn(), load_plan(best["plan"]))
    model.load_state_dict(torch.load(run / "models" / f"trial_{best['trial']:05d}.pt", weights_only=True))
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    timed = onnx_session(onnx_bytes(as_deployed(model.eval(), Target.parse("cpu:2")), x), 2)
    shipped = onnxruntime.InferenceSession(
        str(tmp_path / "export" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    (a,), (b,) = timed.run(None, {"input": x.numpy()}), shipped.run(None, {"input": x.numpy()})
    assert a.shape == b.shape == (8, 10) and float(abs(a - b).max()) <= 1e-4
    with pytest.raises(LatencyBudgetError, match="out of reach"):  # a new run is still refused
        search(out=str(tmp_path / "new"), model="helpers:wide_cnn", dataset="digits", budget=0.9,
               budget_metric="latency", target="cpu:2", target_batch=8, trials=1, quiet=True)  # fmt: skip


@pytest.mark.parametrize("threads", ["1", "more than the cores"])
def test_unreachable_latency_budget_is_refused_before_any_trial(tmp_path: Path, threads: str) -> None:
    """A latency budget below the fastest plan of the space: a one-line error, exit code 2, and
    no run folder. A target with more threads than cores is warned about first."""
    n = 1 if threads == "1" else cpu_cores() + 1
    proc = run_cli(
        [
            "--budget",
            "0.05",
            "--budget-metric",
            "latency",
            "--target",
            f"cpu:{n}",
            "--out",
            str(tmp_path / "run"),
        ],
        home=tmp_path,
        session_cache=True,
    )
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fga-search: error: --budget 0.05 of the latency is out of reach on ")
    floor = float(re.search(r"estimated at ([0-9.]+) of the original", last).group(1))  # type: ignore[union-attr]
    assert 0.05 < floor <= 1.0 and f"use --budget {floor + 0.01:.2f} or more" in last
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()
    warned = f"warning: --target cpu:{n} asks for {n} threads, but this process has {cpu_cores()} core(s)"
    assert (warned in proc.stderr) == (threads != "1"), proc.stderr


@pytest.mark.parametrize("rest_share", [0.3, -0.25])
def test_refused_latency_budget_names_a_share_only_when_there_is_one(
    wide_latency: LatencyModel, rest_share: float
) -> None:
    """The refusal says how much of the original's time lies outside the convolutions; when the
    convolutions, timed one at a time, add up to more than the whole model (a share below zero),
    it says that instead of printing a negative percentage."""
    from fga_search.engine._setup import LatencyBudgetError, check_latency_budget

    lat = wide_latency
    lat.rest_ms = rest_share * lat.base_ms
    fastest = {name: (1, 1) for name in lat.dense}
    with pytest.raises(LatencyBudgetError) as info:
        check_latency_budget(0.0, lat, fastest, lat.table.target)
    message = str(info.value)
    assert info.value.floor == pytest.approx(lat.ratio(fastest))
    assert f"use --budget {info.value.floor + 0.01:.2f} or more" in message
    if rest_share >= 0:
        assert "everything but the convolutions takes 30% of it" in message
    else:
        assert "%" not in message
        assert (
            f"timed one at a time, add up to {1.25 * lat.base_ms:.2f} ms, more than the whole model"
            in message
        )


def test_setup_calibrates_on_the_fastest_plan_measured_side_by_side(wide_latency: LatencyModel) -> None:
    from fga_search.engine._setup import calibrate_latency
    from fga_search.engine._space import load_space
    from fga_search.latency import measure_side_by_side

    lat = wide_latency
    space = load_space("default").resolve(lat.profile.layers)
    fastest = calibrate_latency(lat, wide_cnn(), space)
    assert set(fastest) == {layer.name for layer in space.layers}
    for layer in space.layers:
        low = {g: layer.rank_for(g, layer.rank.low) for g in layer.groups}
        assert fastest[layer.name] == lat.fastest_choice(layer.name, layer.groups, low)
    assert any(choice != "keep" for choice in fastest.values())
    assert lat.scale == 1.0 or 0.1 <= lat.scale <= 10.0
    ms = measure_side_by_side(
        {"a": wide_cnn(), "b": wide_cnn()},
        input_shape=(1, 8, 8),
        target=Target.parse("cpu:1"),
        rounds=2,
        repeats=3,
    )
    assert set(ms) == {"a", "b"} and min(ms.values()) > 0
    with pytest.raises(ValueError, match="rounds must be >= 1, got 0"):
        measure_side_by_side({"a": wide_cnn()}, input_shape=(1, 8, 8), target=Target.parse("cpu:1"), rounds=0)
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        measure_side_by_side(
            {"a": wide_cnn()}, input_shape=(1, 8, 8), target=Target.parse("cpu:1"), repeats=0
        )


def test_side_by_side_copies_each_model_to_the_target_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rounds time the same copies: a copy per model, not per model and round."""
    import fga_search.latency._latency_measure as latency

    copies: list[int] = []
    prepare = latency._prepare

    def counted(module: nn.Module, target: Target) -> nn.Module:
        copies.append(id(module))
        return prepare(module, target)

    monkeypatch.setattr("fga_search.latency._latency_measure._prepare", counted)
    models = {"a": wide_cnn(), "b": wide_cnn()}
    ms = latency.measure_side_by_side(
        models, input_shape=(1, 8, 8), target=Target.parse("cpu:1"), rounds=4, repeats=2
    )
    assert set(ms) == {"a", "b"} and min(ms.values()) > 0
    assert sorted(copies) == sorted(id(m) for m in models.values())


def test_a_model_is_timed_as_its_export_runs_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from fga_search import decompose
    from fga_search.latency import block_diagonal_copy, measure_as_exported

    model, _ = layers()
    assert block_diagonal_copy(model) is None  # no FGA layer
    fga = decompose(model, {"0": (2, 4), "1": (1, 3)})
    fast = block_diagonal_copy(fga)
    assert fast is not None
    executions = {n: m.cpu_execution for n, m in fast.named_modules() if isinstance(m, FGAConv2d)}
    assert executions == {"0": "block_diagonal", "1": "grouped"}  # g = 1 has nothing to change
    assert [m.cpu_execution for m in fga.modules() if isinstance(m, FGAConv2d)] == ["grouped", "grouped"]
    timed: list[list[str]] = []

    def side_by_side(models: dict[str, nn.Module], **_: object) -> dict[str, float]:
        timed.append(list(models))
        return {"grouped": 3.0, "block_diagonal": 2.0}

    monkeypatch.setattr("fga_search.latency._latency_measure.measure_side_by_side", side_by_side)
    assert measure_as_exported(fga, input_shape=(16, 12, 12), target=Target.parse("cpu:1")) == 2.0
    assert timed == [["grouped", "block_diagonal"]]
    plain = measure_as_exported(model, input_shape=(16, 12, 12), target=Target.parse("cpu:1"), repeats=3)
    assert plain > 0 and len(timed) == 1  # measured alone: no FGA layer to run another way


def test_side_by_side_as_exported_reports_each_model_at_its_faster_execution(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fga_search import decompose
    from fga_search.latency import measure_side_by_side_as_exported

    model, _ = layers()
    fga = decompose(model, {"0": (2, 4)})
    seen: list[list[str]] = []

    def side_by_side(models: dict[str, nn.Module], **_: object) -> dict[str, float]:
        seen.append(list(models))
        return {"o": 5.0, "p": 3.0, "p, block-diagonal": 2.0}

    monkeypatch.setattr("fga_search.latency._latency_measure.measure_side_by_side", side_by_side)
    cpu = Target.parse("cpu:1")
    assert measure_side_by_side_as_exported({"o": model, "p": fga}, input_shape=(16, 12, 12), target=cpu) == {
        "o": 5.0,
        "p": 2.0,
    }
    assert seen == [["o", "p", "p, block-diagonal"]]  # the original has no FGA layer to run another way


def test_models_are_timed_as_deployed_with_batch_norms_folded_on_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The search times every model as the export runs it: on a CPU target with its batch norms
    folded, the original's alike; the models it was given keep theirs."""
    import torch

    from fga_search import decompose
    from fga_search.latency import LatencyStats, as_deployed, measure_side_by_side_as_exported

    model = wide_cnn().eval()
    fga = decompose(model, {"3": (2, 8)})
    cpu, cuda = Target.parse("cpu:1"), Target("cuda", None, 1, "float32", False)
    deployed = as_deployed(fga, cpu)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), fga(x), rtol=1e-4, atol=1e-4)
    assert as_deployed(fga, cuda) is fga  # the export's fold is a CPU decision

    def batch_norms(module: nn.Module) -> int:
        return sum(isinstance(m, nn.BatchNorm2d) for m in module.modules())

    seen: dict[str, int] = {}

    def side_by_side(models: dict[str, nn.Module], **_: object) -> dict[str, float]:
        seen.update({name: batch_norms(m) for name, m in models.items()})
        return {name: 1.0 for name in models}

    monkeypatch.setattr("fga_search.latency._latency_measure.measure_side_by_side", side_by_side)
    measure_side_by_side_as_exported({"original": model, "fga": fga}, input_shape=(1, 8, 8), target=cpu)
    assert seen == {"original": 0, "fga": 0, "fga, block-diagonal": 0}
    assert batch_norms(model) == batch_norms(fga) == 3

    baselines: list[int] = []

    def latency(module: nn.Module, **_: object) -> LatencyStats:
        baselines.append(batch_norms(module))
        return LatencyStats(1.0, 1.0, 1.0, 1)

    for where in ("_latency_table", "_latency_measure"):  # the original's baseline, and its layers
        monkeypatch.setattr(f"fga_search.latency.{where}.measure_latency", latency)
    profile = ModelProfile(model, input_shape=(1, 8, 8))
    LatencyModel(model, profile, LatencyTable(cpu, path=str(tmp_path / "table.json")), repeats=1)
    assert baselines[0] == 0  # the original's baseline, folded; then its layers alone (no BN)


def test_a_trial_on_a_cpu_target_is_timed_side_by_side_with_the_original(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shared CPU's speed drifts: the trial's ratio comes from the original timed beside it,
    not from the baseline measured when the search started."""
    import dataclasses

    from fga_search.engine._config import RunConfig
    from fga_search.engine._setup import prepare
    from fga_search.engine._strategies import uniform_plan
    from fga_search.train._trial import OverBudget, TrialRunner

    setup = prepare(RunConfig(out=str(tmp_path / "run"), device="cpu", quiet=True, epochs=0), log=False)
    timed: list[dict[str, nn.Module]] = []

    def side_by_side(models: dict[str, nn.Module], **_: object) -> dict[str, float]:
        timed.append(dict(models))
        return {"original": 4.0, "trial": 2.0}

    monkeypatch.setattr("fga_search.train._trial.measure_side_by_side_as_exported", side_by_side)
    plan = uniform_plan(setup.profile, budget=0.5, groups=1)
    for budget in (None, 0.4):
        settings = dataclasses.replace(
            setup.settings,
            latency_target=Target.parse("cpu:1"),
            latency_base_ms=1000.0,
            max_latency_ratio=budget,
        )
        runner = TrialRunner(
            model=setup.model, data=setup.data, normalization=setup.normalization, device=setup.device,
            settings=settings, profile=setup.profile,
        )  # fmt: skip
        if budget is None:
            out = runner.run(plan, seed=0)
            assert out.latency_ms == 2.0 and out.latency_ratio == 0.5  # not 2.0 / 1000.0
        else:
            with pytest.raises(OverBudget, match=r"2\.000 ms is 0\.500 of the original's"):
                runner.run(plan, seed=0)
        assert set(timed[-1]) == {"original", "trial"} and timed[-1]["original"] is runner.model
    assert len(timed) == 2
    # a plan that keeps every layer is the original: ratio 1, within a budget of 1, never timed
    settings = dataclasses.replace(settings, max_latency_ratio=1.0)
    runner = TrialRunner(
        model=setup.model, data=setup.data, normalization=setup.normalization, device=setup.device,
        settings=settings, profile=setup.profile,
    )  # fmt: skip
    monkeypatch.setattr(
        "fga_search.train._trial.measure_side_by_side_as_exported",
        lambda *_, **__: {"original": 4.0, "trial": 4.2},
    )
    out = runner.run({name: KEEP for name in plan}, seed=0)
    assert out.latency_ratio == 1.0 and out.latency_ms == 1000.0
    assert out.macs == setup.profile.base_macs
    assert len(timed) == 2


@pytest.mark.parametrize("execution", ["conv", "grouped", "block_diagonal", "dense"])
def test_a_table_layer_built_directly_is_the_graph_the_exporter_writes(execution: str) -> None:
    """The lookup table's lone layers skip torch.onnx.export (80 ms each): the graph built
    directly has the exporter's ops, attributes and outputs."""
    import io
    import warnings

    import onnx
    import torch

    from fga_search.core._fga import with_cpu_execution
    from fga_search.latency._runtimes import _layer_onnx, onnx_session

    conv = nn.Conv2d(16, 8, 3, padding=1, stride=2, dilation=1, bias=True)
    model = conv if execution == "conv" else FGAConv2d.shaped_like(conv, groups=4, rank=2).eval()
    if execution in ("block_diagonal", "dense"):
        model = with_cpu_execution(model, execution)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buffer, dynamo=False, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})  # fmt: skip
    direct = _layer_onnx(model, x)
    assert direct is not None

    def ops(data: bytes) -> list[tuple[str, dict[str, object]]]:
        nodes = onnx.load_from_string(data).graph.node  # weights computed in forward: Constant nodes
        return [
            (n.op_type, {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute})
            for n in nodes
            if n.op_type != "Constant"
        ]

    assert ops(direct) == ops(buffer.getvalue()) and len(ops(direct)) == (
        1 if execution in ("conv", "dense") else 2
    )
    (a,), (b,) = (onnx_session(d, 1).run(None, {"input": x.numpy()}) for d in (direct, buffer.getvalue()))
    assert a.shape == (2, 8, 4, 4) and float(abs(a - b).max()) == 0.0
    assert _layer_onnx(nn.Sequential(conv), x) is None  # anything else goes through the exporter
