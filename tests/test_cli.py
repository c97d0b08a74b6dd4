from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from fga_search._cli import main
from fga_search.core._plan import load_plan
from helpers import rows, run_cli

QUICK = ["--trials", "12", "--epochs", "3", "--quiet"]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def quickstart(home: Path) -> tuple[Path, str]:
    """`fga-search --budget 0.2` as a user runs it, with fewer trials."""
    result = run_cli(["--budget", "0.2", "--trials", "16"], home=home)
    assert result.returncode == 0, result.stderr
    return home / "runs" / "digits_cnn-digits-b0.2", result.stdout + result.stderr


@pytest.mark.slow
def test_quickstart_runs_and_writes_a_run_folder(quickstart: tuple[Path, str], home: Path) -> None:
    run, output = quickstart
    for name in ("study.db", "trials.parquet", "pareto.parquet", "run.json"):
        assert (run / name).is_file(), name
    assert (
        home / ".cache" / "fga-search" / "models" / "digits_cnn-v1.pt"
    ).is_file()  # cached model, not in the package
    record = json.loads((run / "run.json").read_text())
    assert record["identity"]["budget"] == 0.2 and record["identity"]["model"] == "digits_cnn"
    assert record["versions"]["torch"] == torch.__version__
    baseline = record["baseline"]["val_acc"]
    trials = rows(run / "trials.parquet")
    assert len(trials) >= 16 and sum(r["state"] == "COMPLETE" for r in trials) >= 15
    front = rows(run / "pareto.parquet")
    print(
        f"\nquickstart: baseline val {baseline:.4f}; front: "
        + ", ".join(f"{r['val_acc']:.3f}@{r['flops_ratio']:.3f}" for r in front)
    )
    assert len(front) >= 3
    assert all(r["flops_ratio"] <= 0.2 and r["within_budget"] for r in front)
    assert max(r["val_acc"] for r in front) >= 0.95 * baseline
    assert all(r["test_acc"] is not None for r in front)
    assert sum(r["is_best"] for r in front) == 1 and sum(r["is_knee"] for r in front) == 1
    best = next(r for r in front if r["is_best"])
    assert (run / "models" / f"trial_{best['trial']:05d}.pt").is_file()
    # progress lines: trials done/total, best so far within budget, ETA
    assert "[1/16] trial 0" in output and "best within budget" in output and "ETA" in output
    assert f"best model: trial {best['trial']}" in output
    # no --target: the front and the original timed on the CPU after the search, side by side
    timed = json.loads((run / "front_latency.json").read_text())
    assert timed["batch"] == 1 and timed["runs"] == 30 and timed["original_ms"] > 0
    assert timed["batch_norms"].startswith("folded into the convs before them, the original's alike")
    assert (
        sorted(timed["trials"])
        == sorted(timed["block_diagonal_layers"])
        == sorted(timed["dense_layers"])
        == sorted(str(r["trial"]) for r in front)
    )
    for r in front:  # as its export would: only grouped convs (g > 1) run block-diagonal, any pair dense
        pairs = [c for c in load_plan(r["plan"]).values() if c != "keep"]
        grouped = sum(1 for c in pairs if c[0] > 1)  # type: ignore[index]
        block_diagonal = timed["block_diagonal_layers"][str(r["trial"])]
        assert 0 <= block_diagonal <= grouped
        assert 0 <= timed["dense_layers"][str(r["trial"])] <= len(pairs) - block_diagonal
    for r in front:
        assert r["latency_ms"] is None and r["cpu_latency_ms"] == timed["trials"][str(r["trial"])]
        assert r["cpu_latency_ratio"] == pytest.approx(r["cpu_latency_ms"] / timed["original_ms"], rel=1e-12)
        assert (
            f"trial {r['trial']:>4}: val {r['val_acc']:.4f}, test {r['test_acc']:.4f}, FLOPs {r['flops_ratio']:.3f}, "
            f"CPU latency {r['cpu_latency_ratio']:.3f}, params {r['params_ratio']:.3f}"
        ) in output
    # the best and the knee say when they run slower than the original on this CPU
    for r in front:
        line = next(x for x in output.splitlines() if x.startswith(f"  trial {r['trial']:>4}:"))
        slower = r["cpu_latency_ratio"] > 1 and (r["is_best"] or r["is_knee"])
        assert ("slower than the original on this CPU" in line) == slower, line
    assert ("warning: the best model runs" in output) == (best["cpu_latency_ratio"] > 1)
    report = (run / "report.md").read_text()
    assert (
        "| latency | the front's members and the original timed side by side on this CPU after the search"
        in report
    )
    assert "batch 1, as exported, medians of 30 runs" in report
    header = next(line for line in report.splitlines() if line.startswith("| trial | pick |"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[cols.index("MACs") + 1 : cols.index("MACs") + 3] == ["CPU latency", "CPU latency %"]
    assert (
        f"* CPU latency: {best['cpu_latency_ms']:.3g} ms ({100 * best['cpu_latency_ratio']:.1f} %)" in report
    )


@pytest.mark.slow
def test_budget_is_respected_and_feasibility_recorded(quickstart: tuple[Path, str]) -> None:
    run, _ = quickstart
    trials = rows(run / "trials.parquet")
    tuned = [r for r in trials if (r["finetune_steps"] or 0) > 0]
    assert tuned and all(r["flops_ratio"] <= 0.2 for r in tuned)
    assert all(
        r["macs_measured"] == r["macs"] for r in tuned
    )  # FlopCounterMode agrees with the analytic count
    feasible = sum(bool(r["within_budget"]) for r in trials) / len(trials)
    assert feasible >= 0.9
    assert all(r["proposal_within_budget"] is not None for r in trials)


@pytest.mark.slow
def test_rerun_resumes_with_nothing_to_do(quickstart: tuple[Path, str], home: Path) -> None:
    run, _ = quickstart
    before = rows(run / "trials.parquet")
    result = run_cli(["--budget", "0.2", "--trials", "16"], home=home)
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stderr
    after = rows(run / "trials.parquet")
    assert [(r["trial"], r["val_acc"]) for r in after] == [(r["trial"], r["val_acc"]) for r in before]


def test_summary_says_when_a_pick_is_slower_than_the_original(tmp_path: Path) -> None:
    """The search's last lines: the best and the knee say when they run slower than the original
    (on this CPU without a --target, on the target with one), and a slower best adds a warning."""
    from fga_search._cli import _summary
    from fga_search.engine._policy import SearchResult
    from fga_search.runs._records import FrontRecord

    common = {"val_acc": 0.9, "test_acc": 0.9, "params_ratio": 0.2}
    knee = FrontRecord(trial=3, flops_ratio=0.1, cpu_latency_ratio=0.8, is_knee=True, **common)
    best = FrontRecord(trial=7, flops_ratio=0.19, cpu_latency_ratio=1.25, is_best=True, **common)
    other = FrontRecord(trial=9, flops_ratio=0.15, cpu_latency_ratio=1.4, **common)
    result = SearchResult(
        run_dir=str(tmp_path), trials=10, finished=10, front=[knee, other, best], best=best, baseline={}
    )
    lines = _summary(result)
    assert lines[3].endswith("CPU latency 0.800, params 0.200 <- knee")  # faster: nothing said
    assert lines[4].endswith("CPU latency 1.400, params 0.200")  # not a pick
    assert lines[5].endswith(
        "CPU latency 1.250, params 0.200 <- best within budget "
        "(slower than the original on this CPU: 1.25x its latency)"
    )
    assert lines[-1] == (
        "warning: the best model runs 1.25x the original's latency on this CPU: its fewer FLOPs (0.190 "
        "of the original's) do not make it faster here; to search for speed, try --budget-metric latency "
        "--target cpu"
    )
    assert sum(line.startswith("warning:") for line in lines) == 1

    # measured on the --target during the search; the knee slower there, the best not
    on_target = [
        FrontRecord(trial=3, flops_ratio=0.1, latency_ratio=1.1, is_knee=True, **common),
        FrontRecord(trial=7, flops_ratio=0.19, latency_ratio=0.9, is_best=True, **common),
    ]
    lines = _summary(
        SearchResult(
            run_dir=str(tmp_path), trials=2, finished=2, front=on_target, best=on_target[1], baseline={}
        )
    )
    assert lines[3].endswith(
        "latency 1.100, params 0.200 <- knee (slower than the original on the target: 1.10x its latency)"
    )
    assert lines[4].endswith("latency 0.900, params 0.200 <- best within budget")
    assert not any(line.startswith("warning:") for line in lines)


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err
    return code, err


def test_budget_out_of_range(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for budget in ("0", "1.5", "-0.2", "nan"):
        code, err = run_main(["--budget", budget, "--out", str(tmp_path / "run")], capsys)
        assert code == 2
        assert err.strip() == f"fga-search: error: --budget must be in (0, 1], got {float(budget)!r}"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "resnet57"], "unknown model 'resnet57'; zoo models: digits_cnn, resnet110"),
        (
            ["--dataset", "mnist"],
            "unknown dataset 'mnist'; valid datasets: digits, cifar10, cifar100, imagefolder",
        ),
        (["--space", "resnett"], "unknown space 'resnett'; shipped spaces: default, resnet_cifar"),
        (["--model", "digits_cnn", "--weights", "missing.pt"], "weights file not found: missing.pt"),
        (["--device", "tpu"], "unknown device 'tpu'; use cpu, cuda or cuda:N"),
    ],
)
def test_bad_names(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    out = tmp_path / "run"
    code, err = run_main([*args, "--out", str(out), *QUICK], capsys)
    assert code == 2
    assert err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_bad_front_latency_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_main(["--front-latency-runs", "5", "--out", str(tmp_path / "run")], capsys)
    assert code == 2
    assert err == "fga-search: error: --front-latency-runs must be 0 (skip) or an integer >= 10, got 5\n"
    assert not (tmp_path / "run").exists()


NEED_TARGET = (
    "--target-batch, --target-dtype, --target-memory-format and --target-runtime need --target "
    "(e.g. cpu:2 or cuda)"
)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--target", "cpu:2"],
            "--target 'cpu:2' is used by a latency objective or --budget-metric latency;",
        ),
        (["--target", "cuda"], "add --objective accuracy,flops,latency to search and report latency on it"),
        (
            ["--objective", "accuracy,latency", "--target", "cpu:0"],
            "--target 'cpu:0': cpu:THREADS needs at least 1",
        ),
        (
            ["--budget-metric", "latency", "--target", "gpu"],
            "--target 'gpu': use cpu, cpu:THREADS, cuda or cuda:INDEX",
        ),
        (["--target-batch", "8"], NEED_TARGET),
        (["--target-dtype", "bf16"], NEED_TARGET),
        (["--target-memory-format", "channels_last"], NEED_TARGET),
        (["--target-runtime", "onnxruntime"], NEED_TARGET),
        (
            ["--budget-metric", "latency", "--target", "cuda", "--target-runtime", "onnxruntime"],
            "target runtime onnxruntime is measured on the CPU here, got device 'cuda'",
        ),
        (
            [
                "--budget-metric",
                "latency",
                "--target",
                "cpu",
                "--target-dtype",
                "bf16",
                "--target-runtime",
                "onnxruntime",
            ],
            "target runtime onnxruntime runs float32 here, got dtype 'bf16'",
        ),
    ],
)
def test_a_target_that_would_be_ignored_or_cannot_be_used_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    out = tmp_path / "run"
    code, err = run_main([*args, "--out", str(out), *QUICK], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("fga-search: error: ") and message in err, err
    assert not out.exists()


def test_bad_choice_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--sampler", "cmaes", "--out", str(tmp_path / "run")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argument --sampler: invalid choice: 'cmaes'" in err
    assert not (tmp_path / "run").exists()


def test_every_run_config_field_is_one_option_with_its_default() -> None:
    """The search's options are RunConfig's fields, one each, with RunConfig's defaults and the
    choices of the registries behind them: nothing is restated in the command line."""
    from dataclasses import MISSING, fields

    from fga_search._cli import _parser
    from fga_search.engine import _strategies
    from fga_search.engine._config import STRATEGIES, RunConfig
    from fga_search.engine._option import option_of
    from fga_search.engine._study import SAMPLERS
    from fga_search.latency._latency_target import DTYPES

    actions = [a for a in _parser()._actions if a.dest != "help"]
    by_dest = {a.dest: a for a in actions}
    assert len(by_dest) == len(actions)  # one option a field
    cli_fields = [f for f in fields(RunConfig) if option_of(f) is not None]  # KeyError: not marked
    assert [f.name for f in cli_fields] == [a.dest for a in actions]
    assert len(cli_fields) == len(fields(RunConfig)) == 54  # no field is API-only today
    made_by_the_command_line = []
    for f in cli_fields:
        action, cli = by_dest[f.name], option_of(f)
        assert cli is not None and action.help == cli.text(f.default)
        assert action.choices == cli.choices
        if f.default is MISSING or cli.quickstart is not None:
            assert action.default is None
            made_by_the_command_line.append(f.name)
        else:
            assert action.default == f.default and type(action.default) is type(f.default), f.name
    assert made_by_the_command_line == ["trials", "epochs", "out"]
    choices = {f.name: option_of(f).choices for f in cli_fields if option_of(f).choices}
    assert choices["strategy"] is STRATEGIES is _strategies.STRATEGIES  # what strategy_plans checks
    assert choices["sampler"] == tuple(SAMPLERS) == ("nsga2", "tpe", "random")
    assert choices["target_dtype"] == tuple(DTYPES) == ("float32", "bf16", "fp16")
    assert sorted(choices) == [
        "backend", "budget_metric", "objective", "promote", "sampler", "strategy", "target_dtype",
        "target_memory_format", "target_runtime", "val_from",
    ]  # fmt: skip
    assert choices["promote"] == ("continue", "rerun")
    assert choices["target_runtime"] == ("eager", "onnxruntime", "torchscript")
    # with no option given, the command line's config is RunConfig's defaults but for those it makes
    parsed = vars(_parser().parse_args([]))
    assert parsed == {f.name: None if f.name in made_by_the_command_line else f.default for f in cli_fields}


def test_the_search_options_are_built_without_torch() -> None:
    """``fga-search --help`` and the command line's own errors do not load torch: the choices'
    registries (latency dtypes, samplers, strategies) are light."""
    import subprocess
    import sys

    code = (
        "import sys; from fga_search._cli import _parser; p = _parser(); p.format_help(); "
        "print(sorted(m for m in ('torch', 'torchvision', 'pandas', 'pyarrow', 'ray') if m in sys.modules), "
        "len(p._actions))"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["[]", "55"]  # 54 options and --help, none of the heavy modules


def test_the_command_line_makes_the_run_folder_and_the_quickstart_defaults(tmp_path: Path) -> None:
    from fga_search._cli import _config, _parser
    from fga_search.engine._config import RunConfig

    quick = _config(_parser().parse_args(["--budget", "0.3"]))
    assert (quick.out, quick.trials, quick.epochs) == (
        os.path.join("runs", "digits_cnn-digits-b0.3"),
        50,
        3.0,
    )
    assert quick == RunConfig(out=quick.out, budget=0.3, trials=50, epochs=3.0)
    model = _config(_parser().parse_args(["--model", "pkg.nets:net", "--ray-address", "auto"]))
    assert (model.out, model.trials, model.epochs) == (
        os.path.join("runs", "pkg_nets_net-digits-b0.2"),
        40,
        1.0,
    )
    assert model.backend == "ray"  # --ray-address implies it
    given = _config(_parser().parse_args(["--trials", "7", "--epochs", "0", "--out", str(tmp_path / "r")]))
    assert (given.out, given.trials, given.epochs) == (str(tmp_path / "r"), 7, 0.0)


def test_run_config_checks_every_choice_as_the_command_line_does() -> None:
    from fga_search.engine._config import RunConfig

    for name, value, valid in [
        ("strategy", "greedy", "search, uniform, error-alloc, random"),
        ("sampler", "cmaes", "nsga2, tpe, random"),
        ("target_dtype", "int8", "float32, bf16, fp16"),
        ("target_memory_format", "nhwc", "nchw, channels_last"),
        ("backend", "dask", "optuna, ray"),
    ]:
        flag = "--" + name.replace("_", "-")
        with pytest.raises(ValueError, match=rf"^{flag} must be one of {valid}, got '{value}'$"):
            RunConfig(out="runs/x", **{name: value})
    assert RunConfig(out="runs/x", target_memory_format=None).target_memory_format is None


def test_corrupt_and_mismatched_weights(
    tmp_path: Path, shared: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00garbage")
    code, err = run_main(
        ["--model", "digits_cnn", "--weights", str(corrupt), "--out", str(out), *QUICK], capsys
    )
    assert code == 2 and "cannot read weights file" in err and err.count("\n") == 1
    code, err = run_main(
        [
            "--model",
            "digits_cnn",
            "--weights",
            str(shared / "models" / "resnet56_cifar10.pt"),
            "--out",
            str(out),
            *QUICK,
        ],
        capsys,
    )
    assert code == 2 and err.count("\n") == 1
    assert "weights do not fit model 'digits_cnn'" in err and "missing keys: features.0.weight" in err
    assert not out.exists()


def test_data_dir_without_expected_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "data" / "images").mkdir(parents=True)
    out = tmp_path / "run"
    code, err = run_main(
        [
            "--model",
            "resnet20",
            "--dataset",
            "imagefolder",
            "--data-dir",
            str(tmp_path / "data"),
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 2
    assert (
        err.strip()
        == f"fga-search: error: data dir {tmp_path / 'data'} must hold train/ and val/ or test/ folders; found: ['images']"
    )
    assert not out.exists()


def test_bad_space_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    bad_key = tmp_path / "bad_key.yaml"
    bad_key.write_text("groups: [1, 2]\nranks: {low: 0.1}\n")
    code, err = run_main(["--space", str(bad_key), "--out", str(out), *QUICK], capsys)
    assert code == 2 and "unknown key(s) ['ranks']" in err and err.count("\n") == 1
    impossible = tmp_path / "impossible.yaml"
    impossible.write_text("groups: [1, 7]\n")
    code, err = run_main(["--space", str(impossible), "--out", str(out), *QUICK], capsys)
    assert code == 2 and "group count(s) [7] divide no searched layer's input channels" in err
    assert not out.exists()


@pytest.mark.slow
def test_existing_run_folder_with_other_settings(
    quickstart: tuple[Path, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run, _ = quickstart
    (tmp_path / "graynets.py").write_text(
        "from torch import nn\n"
        "def tiny(num_classes=10):\n"
        # (budget 0.2 within its reach: most of its FLOPs are in the convs)
        "    return nn.Sequential(nn.Conv2d(1, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.Flatten(), nn.Linear(512, num_classes))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    snapshot = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    for args, key in (
        (["--budget", "0.3"], "budget=0.2, not 0.3"),
        (["--budget", "0.2", "--model", "graynets:tiny"], "model='digits_cnn', not 'graynets:tiny'"),
        (["--budget", "0.2", "--budget-metric", "params"], "budget_metric='flops', not 'params'"),
        (["--budget", "0.2", "--epochs", "1"], "epochs=3.0, not 1.0"),
        (
            ["--budget", "0.2", "--model", "digits_cnn", "--epochs", "3"],
            "weights_sha256='quickstart', not None",
        ),
    ):
        code, err = run_main([*args, "--out", str(run), "--trials", "16", "--quiet"], capsys)
        assert code == 2, err
        assert err.count("\n") == 1 and key in err and "use another --out" in err, err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == snapshot  # nothing touched


def test_subprocess_error_is_one_line_without_traceback(tmp_path: Path) -> None:
    result = run_cli(["--budget", "2", "--out", str(tmp_path / "run")], home=tmp_path)
    assert result.returncode == 2
    assert result.stderr == "fga-search: error: --budget must be in (0, 1], got 2.0\n"
    assert "Traceback" not in result.stderr and not os.path.exists(tmp_path / "run")


def test_budget_below_what_decomposition_can_reach(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # linear_heavy_cnn: one 1->8 3x3 conv (4,608 MACs) and 133,632 MACs of linear layers
    out = tmp_path / "run"
    args = ["--model", "helpers:linear_heavy_cnn", "--trials", "2", "--epochs", "0", "--quiet"]
    code, err = run_main([*args, "--budget", "0.5", "--out", str(out)], capsys)
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith(
        "fga-search: error: --budget 0.5 of the FLOPs is out of reach for model 'helpers:linear_heavy_cnn': "
        "with every searched layer at its cheapest option it keeps 0.9"
    ), err
    assert "(the 1 searched convs hold 3% of them;" in last and "Traceback" not in err
    assert not out.exists()
    floor = float(last.split("it keeps ")[1].split(" ")[0])
    assert 0.966 <= floor < 1.0  # at least the linear layers' 133,632 of 138,240 MACs
    suggested = last.split("use --budget ")[1].split(" ")[0]
    assert floor <= float(suggested) <= floor + 0.001
    code, err = run_main([*args, "--budget", suggested, "--out", str(out)], capsys)
    assert code == 0, err
    trials = rows(out / "trials.parquet")
    assert trials[0]["status"] == "ok" and {r["status"] for r in trials} <= {"ok", "duplicate"}
    assert all(r["within_budget"] and r["flops_ratio"] >= floor - 0.0005 for r in trials)  # floor: 3 digits


def test_models_with_auxiliary_outputs_fine_tune(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a namedtuple of (logits, aux_logits) in training mode, as torchvision's GoogLeNet returns
    out = tmp_path / "run"
    args = ["--model", "helpers:aux_head_cnn", "--trials", "3", "--epochs", "0.5", "--budget", "0.5"]
    code, err = run_main([*args, "--out", str(out), "--quiet"], capsys)
    assert code == 0, err
    trials = rows(out / "trials.parquet")
    assert len(trials) == 3 and {r["status"] for r in trials} <= {"ok", "duplicate"}, [
        r["fail_reason"] for r in trials
    ]
    done = [r for r in trials if r["status"] == "ok"]
    assert done and all(r["finetune_steps"] > 0 and 0 <= r["val_acc"] <= 1 for r in done)


def test_model_that_fails_in_training_mode_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    args = ["--model", "helpers:small_aux_cnn", "--trials", "2", "--budget", "0.5", "--out", str(out)]
    code, err = run_main([*args, "--epochs", "0.5"], capsys)
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        "fga-search: error: model 'helpers:small_aux_cnn' fails in training mode on 1x8x8 images "
        "(fine-tuning needs it): Calculated padded input size per channel: (8 x 8). Kernel size: (9 x 9). "
        "Kernel size can't be greater than actual input size; use a larger --image-size, or --epochs 0"
    )
    assert not out.exists()
    code, err = run_main([*args, "--epochs", "0", "--quiet"], capsys)  # no training: it runs
    assert code == 0, err
    assert "ok" in {r["status"] for r in rows(out / "trials.parquet")} <= {"ok", "duplicate"}
