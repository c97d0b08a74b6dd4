from __future__ import annotations

import copy
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import REPO
from fga_search import FGAConv2d, build_model, export, load_dataset, load_exported
from fga_search._cli import main
from fga_search.core._fga import with_cpu_execution
from fga_search.core._flops import measure_macs
from fga_search.core._plan import load_plan
from fga_search.core._surgery import apply_plan_structure
from fga_search.deploy._cpu_execution import apply_cpu_execution
from fga_search.latency import Target
from fga_search.models._loader import DeviceSplit, Normalization
from fga_search.train._evaluate import evaluate
from helpers import digits_trial, fake_run, rows

PLAN = {"features.3": [8, 5], "features.6": [8, 2], "features.10": [8, 8], "features.13": [4, 3]}


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, DeviceSplit]:
    """A batch of real, normalised digits images and the test split."""
    data = load_dataset("digits", seed=0)
    norm = Normalization(mean=(0.3058,), std=(0.3763,))
    test = DeviceSplit(data.test, device=torch.device("cpu"), normalization=norm)
    return next(test.batches(64)).x, test


def run_model(run_dir: Path, row: dict) -> torch.nn.Module:
    """The run's own model of a front member: its checkpoint in models/."""
    model = apply_plan_structure(build_model("digits_cnn", num_classes=10), load_plan(row["plan"]))
    state = torch.load(run_dir / "models" / f"trial_{row['trial']:05d}.pt", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def searched_latency(run_dir: Path, row: dict, spec: dict) -> bool:
    """Whether the export of front member ``row`` took the search's PyTorch latency
    (front_latency.json) instead of timing it again; if so, the figures are the search's,
    verbatim, and the model runs as the search timed it: as many block-diagonal and dense FGA
    layers, its batch norms folded, not fine-tuned further."""
    pytorch = spec["latency_at_export"]["pytorch"]
    if pytorch.get("measured_by") != "search":
        assert set(pytorch) == {"ms", "original_ms", "ratio"}  # timed by the export
        return False
    recorded = json.loads((run_dir / "front_latency.json").read_text())
    key = str(row["trial"])
    assert pytorch["ms"] == row["cpu_latency_ms"] == recorded["trials"][key]
    assert pytorch["ratio"] == row["cpu_latency_ratio"]
    assert pytorch["original_ms"] == recorded["original_ms"] and pytorch["runs"] == recorded["runs"] == 30
    ways = list(spec["cpu_execution"]["layers"].values())
    assert ways.count("block_diagonal") == recorded["block_diagonal_layers"][key]
    assert ways.count("dense") == recorded["dense_layers"][key]
    assert spec["bn_fold"]["kept"] and spec["finetune"] is None
    assert spec["latency_at_export"]["measured"].startswith("PyTorch by the search")
    return True


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_export_best_round_trips_in_every_format(
    run_dir: Path, tmp_path: Path, digits: tuple[torch.Tensor, DeviceSplit]
) -> None:
    out = tmp_path / "best"
    result = export(str(run_dir), pick="best", out=str(out), formats=("torchscript", "onnx"), device="cpu")
    front = rows(run_dir / "pareto.parquet")
    best = next(r for r in front if r["is_best"])
    done = [r for r in rows(run_dir / "trials.parquet") if r["status"] == "ok" and r["within_budget"]]
    top = max(r["val_acc"] for r in done)
    assert best["val_acc"] == top
    assert result.trial == best["trial"] and result.pick == "best" and not result.rebuilt
    assert sorted(os.listdir(out)) == ["model.onnx", "model.pt", "model.torchscript.pt", "spec.json"]
    x, test = digits
    loaded = load_exported(out)
    ours = run_model(run_dir, best)
    spec = json.loads((out / "spec.json").read_text())
    # each of the digits CNN's five convs is followed by its batch norm: folded if measured faster
    fold = spec["bn_fold"]
    assert fold["pairs"] == {f"features.{i}": f"features.{i + 1}" for i in (0, 3, 6, 10, 13)}
    assert fold["runs"] == 50 and fold["kept"] == (fold["after_ms"] < fold["before_ms"])
    unfolded = load_exported(out, fold_batchnorm=False)
    bns = [n for n, m in loaded.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns == ([] if fold["kept"] else list(fold["pairs"].values()))
    assert [n for n, m in unfolded.named_modules() if isinstance(m, torch.nn.BatchNorm2d)] == list(
        fold["pairs"].values()
    )
    cpu = spec["cpu_execution"]  # measured on this CPU: which FGA layers run block-diagonal or dense
    pairs = [c for c in load_plan(best["plan"]).values() if c != "keep"]
    assert cpu["candidates"] == len(pairs)  # every pair can run dense; those with g > 1 block-diagonal too
    grouped = [name for name, c in load_plan(best["plan"]).items() if c != "keep" and c[0] > 1]  # type: ignore[index]
    assert {n for n, way in cpu["layers"].items() if way == "block_diagonal"} <= set(grouped)
    assert cpu["kept"] == bool(cpu["layers"]) and set(cpu["layers"].values()) <= {"block_diagonal", "dense"}
    apply_cpu_execution(ours, cpu["layers"])
    assert {n: m.cpu_execution for n, m in loaded.named_modules() if isinstance(m, FGAConv2d)} == {
        n: m.cpu_execution for n, m in ours.named_modules() if isinstance(m, FGAConv2d)
    }
    with torch.no_grad():
        reference = ours(x)
        assert torch.equal(unfolded(x), reference)  # identical outputs to the run's model
        torch.testing.assert_close(loaded(x), reference, rtol=1e-5, atol=1e-5)  # the fold: rounding only
        scripted = torch.jit.load(str(out / "model.torchscript.pt"))
        assert (scripted(x) - reference).abs().max().item() <= 1e-4
    import onnxruntime

    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": x.numpy()})
    assert logits.shape == (64, 10)
    assert float((torch.from_numpy(logits) - reference).abs().max()) <= 1e-4
    # the ONNX graph: grouped convs, or the CPU execution kept above where ONNX Runtime ran it faster
    import onnx

    convs = [n for n in onnx.load(str(out / "model.onnx")).graph.node if n.op_type == "Conv"]
    graph = spec["onnx_graph"]
    plain = sum(1 for c in load_plan(best["plan"]).values() if c == "keep")
    ways = list(cpu["layers"].values())
    if graph is None:
        assert not cpu["kept"]
        assert len(convs) == plain + 2 * len(pairs)
    else:
        assert (
            cpu["kept"]
            and graph["runs"] == 50
            and set(graph["onnxruntime_ms"]) == {"grouped", "cpu_execution"}
        )
        faster = min(graph["onnxruntime_ms"], key=graph["onnxruntime_ms"].__getitem__)
        assert graph["graph"] == faster
        folded = ways.count("dense") if faster == "cpu_execution" else 0
        assert len(convs) == plain + 2 * len(pairs) - folded
    assert sorted(os.listdir(out)) == ["model.onnx", "model.pt", "model.torchscript.pt", "spec.json"]
    # the numbers are measured on the loaded model and equal the trial's
    macs = measure_macs(with_cpu_execution(loaded, "grouped"), input_shape=(1, 8, 8))
    assert macs == best["macs"] == result.macs
    with torch.no_grad():  # as it runs on a CPU: block-diagonal and dense convs execute more MACs
        executed = measure_macs(loaded, input_shape=(1, 8, 8))
    assert executed == (cpu["executed_macs"] if cpu["kept"] else macs)
    assert sum(p.numel() for p in unfolded.parameters()) == best["params"] == result.params
    test_acc = evaluate(loaded, test)
    assert result.test_acc == pytest.approx(test_acc, abs=1e-9)
    assert result.test_acc == pytest.approx(best["test_acc"], abs=1e-9)  # the same weights, the same data
    assert result.val_acc == pytest.approx(best["val_acc"], abs=1e-9)
    run = json.loads((run_dir / "run.json").read_text())
    assert spec["model"] == run["model"] == {"source": "zoo", "name": "digits_cnn", "space": "default"}
    assert load_plan(json.dumps(spec["plan"])) == load_plan(best["plan"])
    assert spec["input_shape"] == [1, 8, 8] and spec["num_classes"] == 10 and spec["classes"][3] == "3"
    assert spec["normalization"] == run["normalization"]
    assert spec["flops"]["macs"] == macs and spec["flops"]["ratio"] == pytest.approx(best["flops_ratio"])
    assert spec["params"]["ratio"] == pytest.approx(best["params_ratio"])
    assert spec["original"]["macs"] == run["baseline"]["macs"]
    assert spec["fga_search_version"] == run["versions"]["fga_search"]
    diffs = spec["verification"]["max_abs_diff"]
    assert diffs["model.pt"] == 0.0 or (
        (cpu["kept"] or fold["kept"]) and diffs["model.pt"] <= 1e-5
    )  # rounding
    assert diffs["torchscript"] <= 1e-4 and 0 <= diffs["onnx"] <= 1e-4
    assert spec["files"]["model.pt"]["bytes"] == (out / "model.pt").stat().st_size
    # both models timed side by side at export, in PyTorch and in ONNX Runtime
    lat = spec["latency_at_export"]
    assert lat["batch"] == 1 and lat["runs"] == 50 and lat["threads"] == torch.get_num_threads()
    assert set(lat) >= {"pytorch", "onnxruntime", "device"} and "threads)" in lat["device"]
    for runtime in ("pytorch", "onnxruntime"):
        r = lat[runtime]
        assert 0 < r["ms"] < 1000 and 0 < r["original_ms"] < 1000
        assert r["ratio"] == pytest.approx(r["ms"] / r["original_ms"], rel=1e-12)
    fair = lat.get("pytorch_vs_folded_original")
    if searched_latency(run_dir, best, spec):
        # the search timed this front member as exported here: its figures, not timed again
        assert fair is None  # the search's original: its batch norms folded alike
    else:
        # with the fold kept, also against the original folded alike (the fold's own gain is not the plan's)
        assert (fair is not None) == fold["kept"]
        if fair:
            assert fair["ms"] == lat["pytorch"]["ms"] and 0 < fair["original_ms"] < 1000
    # model.pt holds plain tensors only
    state = torch.load(out / "model.pt", weights_only=True)
    assert isinstance(state, dict) and all(type(v) is torch.Tensor for v in state.values())
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".fga-export")]  # no staging left


@pytest.mark.slow
def test_knee_and_trial_id_picks(run_dir: Path, tmp_path: Path) -> None:
    front = rows(run_dir / "pareto.parquet")
    knee = next(r for r in front if r["is_knee"])
    result = export(str(run_dir), pick="knee", out=str(tmp_path / "knee"), device="cpu")
    assert result.trial == knee["trial"] and result.pick == "knee"
    assert result.macs == knee["macs"]
    other = front[0]
    result = export(str(run_dir), pick=str(other["trial"]), out=str(tmp_path / "by-id"), device="cpu")
    assert result.trial == other["trial"] and result.pick == "trial"
    assert result.spec["source"]["trial"] == other["trial"]


@pytest.mark.slow
def test_trial_without_checkpoint_is_rerun(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A trial whose weights the run did not keep is rebuilt by re-running it with its seed."""
    copied = tmp_path / "run"
    shutil.copytree(run_dir, copied)
    front = rows(run_dir / "pareto.parquet")
    best = next(r for r in front if r["is_best"])
    os.remove(copied / "models" / f"trial_{best['trial']:05d}.pt")
    capsys.readouterr()
    result = export(str(copied), pick="best", out=str(tmp_path / "rerun"), device="cpu")
    assert capsys.readouterr().err == f"re-running trial {best['trial']} from its plan and seed\n"
    assert result.rebuilt and result.spec["source"]["weights"] == "re-run"
    assert result.trial == best["trial"] and result.macs == best["macs"]
    # the same trial again: within one validation image of the search's own result
    assert abs(result.val_acc - best["val_acc"]) <= 1 / 143 + 1e-9
    ours, theirs = run_model(run_dir, best), load_exported(tmp_path / "rerun")
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    assert (a.argmax(1) == b.argmax(1)).float().mean() >= 0.9


@pytest.fixture(scope="module")
def latency_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run searched against measured latency on ``cpu:1`` at batch 2 in bf16, channels_last
    (untrained model).
    Tests copy it before they change it."""
    from fga_search import search

    root = tmp_path_factory.mktemp("latency-run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(root / "cache"))
        search(out=str(root / "run"), model="helpers:wide_cnn", dataset="digits", budget=0.9,
               objective="accuracy,flops,latency", target="cpu:1", target_batch=2, target_dtype="bf16",
               target_memory_format="channels_last", trials=4, epochs=0.2, quiet=True)  # fmt: skip
    return root / "run"


@pytest.mark.slow
def test_a_run_timed_on_a_gpu_exports_on_a_machine_without_one(
    latency_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run searched against a CUDA latency target, exported where there is no CUDA: the export
    needs the trials' weights, data and settings, not the target (the trials measured the
    latency). It exports a front member from its checkpoint, and re-runs a trial without one,
    timing nothing on the target. The model is untrained: its initial weights come from the run's
    seed, in the search's process and in the export's alike."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    run = tmp_path / "run"
    shutil.copytree(latency_run, run)
    record = json.loads((run / "run.json").read_text())
    record["config"]["target"] = "cuda"  # as a search on a GPU machine records it
    (run / "run.json").write_text(json.dumps(record))
    assert not torch.cuda.is_available()
    front = rows(run / "pareto.parquet")
    best = next(r for r in front if r["is_best"])
    result = export(
        str(run), pick="best", out=str(tmp_path / "best"), device="cpu", latency_runs=0, quiet=True
    )
    assert not result.rebuilt and result.trial == best["trial"]
    assert result.spec["latency"]["ms"] == pytest.approx(best["latency_ms"])
    assert result.spec["latency"]["target"] == {
        "target": "cuda", "batch": 2, "dtype": "bf16", "memory_format": "channels_last",
        "key": record["identity"]["target"],
    }  # fmt: skip
    assert record["identity"]["target"].endswith(f"|bf16|batch 2|channels_last|torch {torch.__version__}")
    kept = torch.load(run / "models" / f"trial_{best['trial']:05d}.pt", weights_only=True)
    os.remove(run / "models" / f"trial_{best['trial']:05d}.pt")
    again = export(
        str(run), pick="best", out=str(tmp_path / "rerun"), device="cpu", latency_runs=0, quiet=True
    )
    assert again.rebuilt and again.trial == best["trial"] and again.macs == best["macs"]
    # re-run without timing: the same training as the trial's, which timed its model first
    rerun = torch.load(tmp_path / "rerun" / "model.pt", weights_only=True)
    assert set(rerun) == set(kept)
    for name, value in kept.items():
        torch.testing.assert_close(rerun[name], value, msg=name)


@pytest.mark.slow
def test_the_export_times_its_cpu_choices_on_the_runs_cpu_target(
    latency_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run searched for ``cpu:1`` at batch 2 in bf16, channels_last: the export chooses its CPU
    execution and batch-norm fold, and measures its latency, on that target, not at batch 1 in
    float32, NCHW."""
    import fga_search.exporter._export_execution as export_module

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    seen: list[Target] = []
    choose = export_module.choose_cpu_execution

    def recording(model: torch.nn.Module, **kwargs: Any) -> dict[str, Any]:
        seen.append(kwargs["target"])
        return choose(model, **kwargs)

    monkeypatch.setattr(export_module, "choose_cpu_execution", recording)
    out = tmp_path / "exp"
    code = main(["export", str(latency_run), "--out", str(out), "--latency-runs", "10", "--device", "cpu"])
    assert code == 0
    assert seen == [Target("cpu", 1, 2, "bf16", channels_last=True)]
    spec = json.loads((out / "spec.json").read_text())
    lat = spec["latency_at_export"]
    assert (lat["threads"], lat["batch"], lat["dtype"], lat["runs"]) == (1, 2, "bf16", 10)
    assert lat["memory_format"] == "channels_last"
    assert lat["device"].endswith("(1 threads)") and "bn_fold" in spec and "cpu_execution" in spec
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("latency on this CPU"))
    assert f"({lat['device']}, batch 2, bf16, channels_last, medians of 10 runs side by side)" in line
    assert f"PyTorch {lat['pytorch']['ratio']:.2f}x the original" in line


@pytest.mark.slow
def test_final_finetune_on_train_and_val(
    run_dir: Path, tmp_path: Path, digits: tuple[torch.Tensor, DeviceSplit]
) -> None:
    front = rows(run_dir / "pareto.parquet")
    knee = next(r for r in front if r["is_knee"])
    result = export(str(run_dir), pick="knee", out=str(tmp_path / "ft"), finetune_epochs=1, device="cpu")
    spec = result.spec
    assert spec["finetune"]["epochs"] == 1.0 and spec["finetune"]["data"] == "train+val"
    assert spec["finetune"]["images"] == 1295 + 143 and spec["finetune"]["steps"] == (1295 + 143) // 128
    assert spec["finetune"]["recipe"]["crop"] is True and spec["finetune"]["augment"]["crop_pad"] == 1
    assert spec["accuracy"]["val_held_out"] is False
    _, test = digits
    loaded = load_exported(tmp_path / "ft")
    assert result.test_acc == pytest.approx(evaluate(loaded, test), abs=1e-9)
    before = run_model(run_dir, knee).state_dict()
    after = load_exported(tmp_path / "ft", fold_batchnorm=False).state_dict()  # as trained: BNs unfolded
    assert max((before[k].float() - after[k].float()).abs().max().item() for k in before) > 1e-3
    # the model's MACs are those of its FGA layers run grouped, however the CPU runs them
    assert measure_macs(with_cpu_execution(loaded, "grouped"), input_shape=(1, 8, 8)) == knee["macs"]
    recipe = spec["finetune"]["recipe"]
    assert recipe["lr"] == 0.02 and recipe["batch_size"] == 128  # the run's


def _counting_pytorch_timings(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """Each call of the export's PyTorch latency timing (``measure_side_by_side`` in
    ``_runtime_latency``), recorded by name of the models timed; the real function runs."""
    import fga_search.deploy._runtime_latency as runtime_latency

    calls: list[tuple[str, ...]] = []
    real = runtime_latency.measure_side_by_side

    def counting(models: dict, **kwargs: Any) -> dict[str, float]:
        calls.append(tuple(models))
        return real(models, **kwargs)

    monkeypatch.setattr(runtime_latency, "measure_side_by_side", counting)
    return calls


@pytest.mark.slow
def test_the_search_timing_of_a_front_member_is_reused_only_for_the_model_it_timed(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The search timed each front member on this CPU as the export runs it (front_latency.json):
    for that model the export takes the figures and times nothing; a fine-tuned model, another
    trial, another target or another execution is timed again."""
    from fga_search.exporter._export_execution import ExecutionChoice
    from fga_search.exporter._export_time import FRONT_TARGET, search_timing, time_export
    from fga_search.runs._runview import read_run

    view = read_run(str(run_dir))
    recorded = json.loads((run_dir / "front_latency.json").read_text())
    member = next(r for r in view.front if r["is_best"])
    key = str(member["trial"])
    pairs = [n for n, c in load_plan(member["plan"]).items() if c != "keep"]
    ways = ["block_diagonal"] * recorded["block_diagonal_layers"][key] + ["dense"] * recorded["dense_layers"][
        key
    ]
    assert len(ways) <= len(pairs)
    layers = dict(zip(pairs, ways, strict=False))
    bn = {"pairs": {"features.0": "features.1"}, "kept": True}
    same = ExecutionChoice(cpu_execution={"layers": layers, "kept": bool(layers)}, bn_fold=bn)
    timing = search_timing(view, member["trial"], finetuned=False, target=FRONT_TARGET, execution=same)
    assert timing is not None
    assert (timing.ms, timing.ratio) == (member["cpu_latency_ms"], member["cpu_latency_ratio"])
    assert (timing.original_ms, timing.runs) == (recorded["original_ms"], recorded["runs"])
    # any other model, or another place, is timed again
    other = {pairs[0]: "dense"} if not layers else dict(list(layers.items())[1:])
    unfolded = ExecutionChoice(cpu_execution=same.cpu_execution, bn_fold={**bn, "kept": False})
    front = {r["trial"] for r in view.front}
    elsewhere = next(r["trial"] for r in view.usable if r["trial"] not in front)  # a trial off the front
    for trial, finetuned, target, execution in (
        (member["trial"], True, FRONT_TARGET, same),  # fine-tuned further
        (elsewhere, False, FRONT_TARGET, same),
        (member["trial"], False, Target("cpu", 1), same),
        (member["trial"], False, Target("cpu", None, 2), same),
        (member["trial"], False, FRONT_TARGET, ExecutionChoice(cpu_execution={"layers": other}, bn_fold=bn)),
        (member["trial"], False, FRONT_TARGET, unfolded),
        (member["trial"], False, FRONT_TARGET, ExecutionChoice()),  # nothing chosen (no timing)
    ):
        assert search_timing(view, trial, finetuned=finetuned, target=target, execution=execution) is None
    # the time stage: with the search's figures it times nothing in PyTorch, else it times once
    calls = _counting_pytorch_timings(monkeypatch)
    model, original = run_model(run_dir, member), build_model("digits_cnn", num_classes=10).eval()
    args: dict[str, Any] = dict(input_shape=(1, 8, 8), target=FRONT_TARGET, runs=10, onnx_file=None)
    lat = time_export(model, original, execution=same, reused=timing, scratch=str(tmp_path), **args)
    assert calls == [] and lat is not None
    assert lat["pytorch"] == timing.entry() and lat["pytorch"]["measured_by"] == "search"
    assert lat["runs"] == recorded["runs"] and "pytorch_vs_folded_original" not in lat
    lat = time_export(model, original, execution=same, reused=None, scratch=str(tmp_path), **args)
    assert calls == [("model", "original", "folded original")] and lat is not None
    assert "measured_by" not in lat["pytorch"] and lat["runs"] == 10
    assert set(lat["pytorch_vs_folded_original"]) == {"ms", "original_ms", "ratio"}


@pytest.mark.slow
def test_an_export_times_only_what_the_search_did_not(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end: the best front member, exported as the search timed it, takes the search's
    PyTorch latency and times its model no more; fine-tuned further, or a trial off the front,
    it is timed at export."""
    calls = _counting_pytorch_timings(monkeypatch)
    front = rows(run_dir / "pareto.parquet")
    best = next(r for r in front if r["is_best"])
    result = export(str(run_dir), out=str(tmp_path / "best"), latency_runs=10, device="cpu", quiet=True)
    timed = (
        [("model", "original", "folded original")]
        if result.spec["bn_fold"]["kept"]
        else [("model", "original")]
    )
    assert calls == ([] if searched_latency(run_dir, best, result.spec) else timed)
    calls.clear()
    result = export(
        str(run_dir),
        out=str(tmp_path / "ft"),
        finetune_epochs=0.25,
        latency_runs=10,
        device="cpu",
        quiet=True,
    )
    assert len(calls) == 1 and calls[0][:2] == ("model", "original")
    assert not searched_latency(run_dir, best, result.spec) and result.spec["latency_at_export"]["runs"] == 10
    calls.clear()
    on_front = {r["trial"] for r in front}
    other = next(
        r for r in rows(run_dir / "trials.parquet") if r["status"] == "ok" and r["trial"] not in on_front
    )
    result = export(
        str(run_dir),
        pick=other["trial"],
        out=str(tmp_path / "other"),
        latency_runs=10,
        device="cpu",
        quiet=True,
    )
    assert result.rebuilt and len(calls) == 1 and calls[0][:2] == ("model", "original")
    assert "measured_by" not in result.spec["latency_at_export"]["pytorch"]


def _knee_export_args(run_dir: Path, out: Path) -> list[str]:
    """The export command of the run's knee on the CPU, without latency timing."""
    return [
        "export",
        str(run_dir),
        "--pick",
        "knee",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--latency-runs",
        "0",
    ]


@pytest.mark.slow
def test_final_finetune_takes_its_own_learning_rate_and_batch(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ft"
    code = main(
        [
            *_knee_export_args(run_dir, out),
            "--finetune-epochs",
            "0.25",
            "--finetune-lr",
            "0.03",
            "--finetune-batch-size",
            "64",
        ]
    )
    captured = capsys.readouterr()
    printed = captured.out
    assert code == 0
    assert (
        "fine-tuned 0.25 more epochs on train+val (5 steps of batch 64, peak learning rate 0.03)" in printed
    )
    # progress on stderr: the recipe, then a line per epoch and one after the last step (here only that)
    progress = [line for line in captured.err.splitlines() if line.startswith("final fine-tune:")]
    assert progress[0] == (
        "final fine-tune: 0.25 epochs on 1438 train+val images, batch 64, peak learning rate 0.03, "
        "the original as teacher"
    )
    assert len(progress) == 2 and progress[1].startswith(
        "final fine-tune: epoch 0.2225/0.25 (step 5/5)  loss "
    )
    assert "| ETA 0s" in progress[1]
    ft = json.loads((out / "spec.json").read_text())["finetune"]
    assert ft["recipe"]["lr"] == 0.03 and ft["recipe"]["batch_size"] == 64
    assert ft["steps"] == round(0.25 * (1295 + 143)) // 64 == 5


@pytest.mark.slow
def test_quiet_export_prints_no_progress(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "quiet"
    code = main([*_knee_export_args(run_dir, out), "--finetune-epochs", "0.25", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0 and captured.err == ""
    assert "fine-tuned 0.25 more epochs on train+val (2 steps of batch 128" in captured.out
    assert json.loads((out / "spec.json").read_text())["finetune"]["steps"] == 2


@pytest.mark.slow
def test_export_command_prints_a_summary(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli"
    code = main(
        ["export", str(run_dir), "--pick", "best", "--out", str(out), "--format", "onnx", "--device", "cpu"]
    )
    text = capsys.readouterr().out
    assert code == 0, text
    spec = json.loads((out / "spec.json").read_text())
    assert f"exported trial {spec['source']['trial']} (best within the budget" in text
    for name in ("model.pt", "spec.json", "model.onnx"):
        assert re.search(rf"^  {re.escape(name)}\s+[\d.]+ kB$", text, re.M), text
    assert f"test {spec['accuracy']['test']:.4f} (original: val" in text
    assert (
        f"{100 * spec['flops']['ratio']:.1f} % of the original's 1.779 M (measured with FlopCounterMode)"
        in text
    )
    diffs = spec["verification"]["max_abs_diff"]
    model_pt = "0" if diffs["model.pt"] == 0 else f"{diffs['model.pt']:.2g}"
    check = spec["verification"]
    assert check["tolerance"] == pytest.approx(1e-4 * max(1.0, check["max_abs_output"]))
    assert (
        f"verified: model.pt max |diff| {model_pt}, onnx max |diff| {diffs['onnx']:.2g} "
        f"(tolerance {check['tolerance']:.2g} = 1e-4 x max(1, max |output| {check['max_abs_output']:.3g}))"
        in text
    )
    cpu = spec["cpu_execution"]
    if cpu["kept"]:
        ratio = cpu["after_ms"] / cpu["before_ms"]
        ways = list(cpu["layers"].values())
        parts = []
        if "block_diagonal" in ways:
            parts.append(
                f"{ways.count('block_diagonal')} run their grouped conv as a block-diagonal dense conv"
            )
        if "dense" in ways:
            parts.append(f"{ways.count('dense')} run folded into one dense conv")
        assert f"CPU:      of the {cpu['candidates']} FGA layers, {' and '.join(parts)} on CPU inputs" in text
        assert f"(the model: {ratio:.2f}x the time of all-grouped, measured side by side)" in text
    else:
        assert (
            f"CPU:      the {cpu['candidates']} FGA layers stay grouped (no other execution was faster here)"
            in text
        )
    fold = spec["bn_fold"]
    change = (
        f"the model: {fold['after_ms'] / fold['before_ms']:.2f}x the time unfolded, measured side by side"
    )
    assert (
        f"BN:       5 batch norm(s) folded into the convs before them ({change})"
        if fold["kept"]
        else f"BN:       the 5 batch norm(s) after convs stay unfolded (folding was not faster here: {change})"
    ) in text
    graph = spec["onnx_graph"]
    if graph is None:
        assert "ONNX:" not in text
    else:
        ms = graph["onnxruntime_ms"]
        expected = (
            f"ONNX:     its graph runs the FGA layers as on the CPU above ({ms['cpu_execution']:.3g} ms"
            if graph["graph"] == "cpu_execution"
            else f"ONNX:     its graph keeps grouped convs ({ms['grouped']:.3g} ms in ONNX Runtime"
        )
        assert expected in text
    lat = spec["latency_at_export"]
    line = next(ln for ln in text.splitlines() if ln.startswith("latency on this CPU"))
    assert f"({lat['device']}, batch 1, float32, medians of 50 runs side by side)" in line
    for name, key in (("PyTorch", "pytorch"), ("ONNX Runtime", "onnxruntime")):
        r = lat[key]
        assert f"{name} {r['ratio']:.2f}x the original ({r['ms']:.3g} vs {r['original_ms']:.3g} ms)" in line
    fair = lat.get("pytorch_vs_folded_original")
    best = next(r for r in rows(run_dir / "pareto.parquet") if r["is_best"])
    searched = searched_latency(run_dir, best, spec)
    assert ("PyTorch: the search's measurement of this front member" in text) == searched
    assert (
        fair is not None
        and f"against the original with its batch norms folded alike: PyTorch {fair['ratio']:.2f}x "
        f"({fair['ms']:.3g} vs {fair['original_ms']:.3g} ms)"
        in text
    ) == (fold["kept"] and not searched)
    slower = [
        name
        for name, key in (("PyTorch", "pytorch"), ("ONNX Runtime", "onnxruntime"))
        if lat[key]["ratio"] > 1
    ]
    assert (
        "warning: the exported model is slower than the original in " + " and ".join(slower) in text
    ) == bool(slower)
    # exporting again to the same folder replaces the earlier export
    code = main(_knee_export_args(run_dir, out))
    assert code == 0 and sorted(os.listdir(out)) == ["model.pt", "spec.json"]
    again = json.loads((out / "spec.json").read_text())
    assert again["latency_at_export"] is None and "bn_fold" not in again  # nothing measured: nothing folded
    assert "latency on this CPU" not in capsys.readouterr().out


@pytest.mark.slow
def test_readme_example_loads_an_export(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = (REPO / "README.md").read_text()
    section = text.split("## Choosing and shipping a model", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```py\n(.*?)```", section, re.S)[0]
    export(str(run_dir), pick="best", out=str(tmp_path / "exported"), device="cpu")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README", "exec"), namespace)
    logits = namespace["logits"]
    assert tuple(logits.shape) == (1, 10)


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def _one_line_error(code: int, err: str, message: str) -> None:
    assert code == 2, err
    assert err.startswith("fga-search: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and message in err, err


def test_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = fake_run(
        tmp_path / "run",
        [
            digits_trial(0, PLAN, val_acc=0.97),
            digits_trial(1, PLAN, state="FAIL", status="failed", fail_reason="FloatingPointError: nan"),
            digits_trial(2, {"features.6": [4, 4]}, status="infeasible", within_budget=False),
        ],
    )
    empty = fake_run(
        tmp_path / "empty",
        [digits_trial(0, PLAN, state="FAIL", status="failed", fail_reason="RuntimeError: out of memory")],
    )
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("not a run")
    (tmp_path / "file.txt").write_text("x")
    out = tmp_path / "exported"
    cases = [
        ([str(empty), "--out", str(out)], f"run folder {empty} has no finished trials"),
        (
            [str(run), "--pick", "7", "--out", str(out)],
            f"trial 7 does not exist in run folder {run} (trials 0..2)",
        ),
        (
            [str(run), "--pick", "1", "--out", str(out)],
            "trial 1 is not a finished trial (state FAIL, status failed: FloatingPointError: nan); finished trials: 0",
        ),
        (
            [str(run), "--pick", "2", "--out", str(out)],
            "trial 2 is not a finished trial (state COMPLETE, status infeasible",
        ),
        (
            [str(run), "--pick", "fastest", "--out", str(out)],
            "pick must be 'best', 'knee' or a trial id, got 'fastest'",
        ),
        (
            [str(tmp_path / "plain"), "--out", str(out)],
            f"{tmp_path / 'plain'} is not an fga-search run folder (no run.json)",
        ),
        ([str(tmp_path / "nowhere"), "--out", str(out)], f"run folder {tmp_path / 'nowhere'} does not exist"),
        (
            [str(run), "--out", str(tmp_path / "file.txt" / "exported")],
            f"--out {tmp_path / 'file.txt' / 'exported'}: cannot create it, {tmp_path / 'file.txt'} is not a folder",
        ),
        ([str(run), "--out", str(tmp_path / "plain")], "exists, is not empty and holds no earlier export"),
        (
            [str(run), "--out", str(out), "--format", "tflite"],
            "unknown export format 'tflite'; valid formats: torchscript, onnx",
        ),
        (
            [str(run), "--out", str(out), "--finetune-epochs", "-1"],
            "finetune_epochs must be a number >= 0, got -1.0",
        ),
        (
            [str(run), "--out", str(out), "--finetune-epochs", "1", "--finetune-lr", "0"],
            "finetune_lr must be a number > 0, got 0.0",
        ),
        (
            [str(run), "--out", str(out), "--finetune-epochs", "1", "--finetune-batch-size", "0"],
            "finetune_batch_size must be an integer >= 1, got 0",
        ),
        (
            [str(run), "--out", str(out), "--latency-runs", "5"],
            "latency_runs must be 0 (skip) or an integer >= 10, got 5",
        ),
    ]
    for args, message in cases:
        code, err = _cli(["export", *args], capsys)
        _one_line_error(code, err, message)
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["empty", "file.txt", "plain", "run"]  # nothing half-written
    assert sorted(os.listdir(tmp_path / "plain")) == ["notes.txt"]


def _unwritable_as_root() -> Path:
    """A folder that even root cannot create anything in: /sys where it is mounted read-only,
    else /proc (whose top level takes no new entries). Fails, never skips, if neither refuses."""
    for folder in (Path("/sys"), Path("/proc")):
        probe = folder / "fga-search-export-probe"
        try:
            probe.mkdir()
        except OSError:
            return folder
        probe.rmdir()
    pytest.fail("running as root, and both /sys and /proc are writable: no unwritable folder to test with")


def test_unwritable_output_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = fake_run(tmp_path / "run", [digits_trial(0, PLAN, val_acc=0.97)])
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        target = locked / "exported"
        if os.geteuid() == 0:  # permissions do not stop root; a read-only file system does
            target = _unwritable_as_root() / "fga-search-export-test"
        code, err = _cli(["export", str(run), "--out", str(target)], capsys)
        _one_line_error(code, err, f"--out {target}: cannot write in {target.parent}")
        assert not target.exists()
    finally:
        locked.chmod(0o700)


def test_argument_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for args, message in (
        (["export", str(tmp_path)], "the following arguments are required: --out"),
        (["export", "--out", str(tmp_path / "x")], "the following arguments are required: RUN_DIR"),
        (["export", str(tmp_path), "--out", "x", "--finetune-epochs", "many"], "argument --finetune-epochs"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def test_load_exported_refuses_other_folders(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not an fga-search export"):
        load_exported(tmp_path)
    (tmp_path / "spec.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="is not an fga-search export spec"):
        load_exported(tmp_path / "spec.json")


def test_load_exported_rebuilds_from_spec_and_state_dict(tmp_path: Path) -> None:
    """spec.json + model.pt are enough: the architecture by name, the plan, plain tensors."""
    base = build_model("digits_cnn", num_classes=10)
    model = apply_plan_structure(copy.deepcopy(base), PLAN)
    torch.nn.init.normal_(model.classifier.weight)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    spec = {
        "format": "fga-search-export/1",
        "model": {"source": "zoo", "name": "digits_cnn", "space": "default"},
        "plan": PLAN,
        "num_classes": 10,
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    loaded = load_exported(tmp_path)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    # batch norms recorded as folded are folded at load (unless asked not to), the same function
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1)  # type: ignore[union-attr]
            bn.running_var.uniform_(0.5, 2)  # type: ignore[union-attr]
    torch.save(model.state_dict(), tmp_path / "model.pt")
    pairs = {"features.0": "features.1", "features.3": "features.4"}
    spec["bn_fold"] = {"pairs": pairs, "kept": True}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    folded, kept = load_exported(tmp_path), load_exported(tmp_path, fold_batchnorm=False)
    assert isinstance(folded.features[1], torch.nn.Identity) and isinstance(
        folded.features[4], torch.nn.Identity
    )
    assert isinstance(kept.features[1], torch.nn.BatchNorm2d) and isinstance(
        folded.features[7], torch.nn.BatchNorm2d
    )
    with torch.no_grad():
        assert torch.equal(kept(x), model(x))
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    for bad, message in (
        ({"features.0": "features.2"}, r"'features.0' \(Conv2d\) with 'features.2' \(ReLU\)"),
        (["features.0"], r"bn_fold.pairs must map conv names to BN names"),
    ):
        spec["bn_fold"] = {"pairs": bad, "kept": True}
        (tmp_path / "spec.json").write_text(json.dumps(spec))
        with pytest.raises(ValueError, match=message):
            load_exported(tmp_path)
    del spec["bn_fold"]
    spec["plan"] = {"features.3": [1, 2]}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="do not fit the model described by spec.json"):
        load_exported(tmp_path)


def test_a_format_the_model_cannot_take_is_one_line_and_writes_nothing(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # odd_max_pool_cnn max-pools 8x8 to 3x3, which the TorchScript-based ONNX exporter refuses
    # (it also prints its whole graph to file descriptor 1 on failure: muted)
    run = tmp_path / "run"
    args = ["--model", "helpers:odd_max_pool_cnn", "--trials", "2", "--epochs", "0", "--budget", "0.5"]
    code = main([*args, "--out", str(run), "--quiet"])
    assert code == 0, capfd.readouterr().err
    capfd.readouterr()
    out = tmp_path / "export"
    code = main(
        ["export", str(run), "--out", str(out), "--format", "torchscript,onnx", "--latency-runs", "0"]
    )
    captured = capfd.readouterr()
    assert code == 2
    assert captured.err == (
        "fga-search: error: cannot export the model to ONNX: Unsupported: ONNX export of operator "
        "adaptive_max_pool2d, output size that are not factor of input size; export without onnx "
        "(model.pt and TorchScript do not need it)\n"
    )
    assert "graph(" not in captured.out and "Traceback" not in captured.err
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["run"]  # no staging folder left
    code = main(["export", str(run), "--out", str(out), "--format", "torchscript", "--latency-runs", "0"])
    assert code == 0, capfd.readouterr().err
    assert sorted(os.listdir(out)) == ["model.pt", "model.torchscript.pt", "spec.json"]
    # failing over that earlier export (after its model is rebuilt and written to the staging
    # folder): the earlier export stays as it was, byte for byte, and no staging folder is left
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    code = main(["export", str(run), "--out", str(out), "--format", "onnx", "--latency-runs", "0"])
    assert code == 2 and "cannot export the model to ONNX" in capfd.readouterr().err
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    assert sorted(os.listdir(tmp_path)) == ["export", "run"]
    x = torch.randn(3, 1, 8, 8)
    # a user factory: imported and called only when the caller trusts it (or passes it)
    with pytest.raises(ValueError, match="trust_model_code=True"):
        load_exported(out)
    loaded = load_exported(out, trust_model_code=True)
    torch.testing.assert_close(loaded(x), torch.jit.load(str(out / "model.torchscript.pt"))(x))


def test_onnx_export_of_an_average_pool_to_a_size_that_does_not_divide(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # odd_pool_cnn average-pools 8x8 to 3x3 (as a torchvision VGG pools 1x1 to 7x7 on CIFAR-size
    # images): the exporter alone refuses it; the export writes the equivalent fixed linear map
    import onnxruntime

    run = tmp_path / "run"
    args = ["--model", "helpers:odd_pool_cnn", "--trials", "2", "--epochs", "0", "--budget", "0.5"]
    assert main([*args, "--out", str(run), "--quiet"]) == 0, capfd.readouterr().err
    out = tmp_path / "export"
    code = main(["export", str(run), "--out", str(out), "--format", "onnx", "--latency-runs", "0"])
    assert code == 0, capfd.readouterr().err
    assert sorted(os.listdir(out)) == ["model.onnx", "model.pt", "spec.json"]
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 1, 8, 8)
    (got,) = session.run(["logits"], {"input": x.numpy()})
    with torch.no_grad():
        expected = load_exported(out, trust_model_code=True)(x)  # a user factory: the caller trusts it
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("diff", "scale", "ok"),
    [(5e-5, 0.5, True), (2e-4, 0.5, False), (0.05, 3100.0, True), (0.4, 3100.0, False)],
)
def test_verification_tolerance_scales_with_the_outputs(diff: float, scale: float, ok: bool) -> None:
    from fga_search.exporter._export import TOLERANCE, ExportVerificationError
    from fga_search.exporter._export_verify import check as _check

    limit = TOLERANCE * max(1.0, scale)  # as export() sets it: untrained nets' logits reach 1e3
    if ok:
        assert _check("model.pt", diff, limit) == diff
    else:
        with pytest.raises(
            ExportVerificationError, match=rf"model.pt differs from the PyTorch model by {diff:.3g}"
        ):
            _check("model.pt", diff, limit)
