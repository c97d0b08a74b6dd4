"""Hostile inputs that used to lose data or run code (issue 30, items 1-4): an export over a
folder that is not ours, a run folder moved, copied or reached through a symlink, a damaged
study.db, and a spec.json that names code to run."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from fga_search import export, load_exported, search
from fga_search._cli import main
from helpers import digits_trial, fake_run, rows

PLAN = {"features.3": [8, 5], "features.6": [8, 2], "features.10": [8, 8], "features.13": [4, 3]}
# a small random-init model (helpers.py): no quickstart model to train first
MODEL = "helpers:odd_pool_cnn"
SEARCH = {"model": MODEL, "budget": 0.5, "epochs": 0, "quiet": True, "front_latency_runs": 0}
CLI = ["--model", MODEL, "--budget", "0.5", "--epochs", "0", "--front-latency-runs", "0", "--quiet"]


def _one_line_error(code: int, err: str, message: str) -> None:
    assert code == 2, err
    assert err.startswith("fga-search: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert "Traceback" not in err


def _tree(path: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under ``path``."""
    out: dict[str, bytes | None] = {}
    for root, dirs, files in os.walk(path):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), path)] = None
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, path)] = Path(p).read_bytes()
    return out


def finished(path: Path) -> list[dict]:
    return [
        r
        for r in rows(path / "trials.parquet")
        if r["state"] == "COMPLETE" or (r["state"] == "FAIL" and r["status"] != "interrupted")
    ]


def studies(path: Path) -> list[str]:
    with sqlite3.connect(path / "study.db") as db:
        return [n for (n,) in db.execute("SELECT study_name FROM studies")]


def same_rows(before: list[dict], after: list[dict]) -> None:
    """Every finished trial of ``before`` is in ``after``, unchanged; no trial number twice."""
    numbers = [r["trial"] for r in after]
    assert len(numbers) == len(set(numbers)), numbers
    by = {r["trial"]: r for r in after}
    for old in before:
        new = by.get(old["trial"])
        assert new is not None, f"trial {old['trial']} lost"
        keys = ("state", "status", "val_acc", "plan", "datetime_start", "datetime_complete")
        assert {k: new[k] for k in keys} == {k: old[k] for k in keys}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def base_run(home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run of 3 trials without fine-tuning (each test copies it)."""
    out = tmp_path_factory.mktemp("runs") / "base"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        search(out=str(out), trials=3, **SEARCH)  # type: ignore[arg-type]
    assert len(finished(out)) == 3
    return out


@pytest.fixture
def in_home(home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(home))
    return home


# -- 2. a run folder's identity does not depend on where it lies ----------------------------
def test_a_copied_run_resumes_its_own_study(base_run: Path, tmp_path: Path, in_home: Path) -> None:
    before = finished(base_run)
    original = _tree(base_run)
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(base_run, copy, symlinks=True)  # cp -a
    result = search(out=str(copy), trials=5, **SEARCH)  # type: ignore[arg-type]
    assert result.finished == 5
    after = finished(copy)
    assert len(after) == 5 and len(rows(copy / "trials.parquet")) == 5
    same_rows(before, after)
    assert len(studies(copy)) == 1  # no second, empty study was opened beside the run's
    assert _tree(base_run) == original  # the original is untouched


def test_a_run_resumed_through_a_symlink_then_by_its_real_path_loses_nothing(
    base_run: Path, tmp_path: Path, in_home: Path
) -> None:
    real = tmp_path / "real"
    shutil.copytree(base_run, real, symlinks=True)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    before = finished(real)
    search(out=str(link), trials=4, **SEARCH)  # type: ignore[arg-type]
    through_link = finished(real)
    assert len(through_link) == 4
    same_rows(before, through_link)
    search(out=str(real), trials=5, **SEARCH)  # type: ignore[arg-type]
    after = finished(real)
    assert len(after) == 5 and len(rows(real / "trials.parquet")) == 5
    same_rows(through_link, after)
    assert len(studies(real)) == 1


_KILLED_WRITER = """
import os, signal, sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA cache_size=1")  # spill to the file mid-transaction, as a big write does
db.execute("BEGIN")
db.execute("CREATE TABLE junk (x)")
db.executemany("INSERT INTO junk VALUES (randomblob(500))", [()] * 2000)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_run_killed_mid_write_of_its_study_resumes(base_run: Path, tmp_path: Path, in_home: Path) -> None:
    """A SIGKILL during a study write leaves a hot journal: SQLite's crash recovery rolls it back,
    and the run resumes (a read-only check of the study refused it: CI's Ray killed-driver case)."""
    run = tmp_path / "run"
    shutil.copytree(base_run, run, symlinks=True)
    before = finished(run)
    subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(run / "study.db")], check=False)
    assert (run / "study.db-journal").stat().st_size > 0
    with pytest.raises(sqlite3.OperationalError, match="readonly"):  # the journal is hot
        sqlite3.connect(f"file:{run / 'study.db'}?mode=ro", uri=True).execute("PRAGMA quick_check")
    result = search(out=str(run), trials=5, **SEARCH)  # type: ignore[arg-type]
    assert result.finished == 5
    same_rows(before, finished(run))
    with sqlite3.connect(run / "study.db") as db:  # the killed transaction was rolled back
        assert "junk" not in {n for (n,) in db.execute("SELECT name FROM sqlite_master")}


@pytest.mark.parametrize("extra_study", [False, True])
def test_a_run_whose_study_is_named_after_its_old_path_still_resumes(
    base_run: Path, tmp_path: Path, in_home: Path, extra_study: bool
) -> None:
    """Runs created before run.json recorded the study's name named it after the folder's path."""
    run = tmp_path / "moved"
    shutil.copytree(base_run, run, symlinks=True)
    record = json.loads((run / "run.json").read_text())
    assert record.pop("study_name") == studies(run)[0]
    (run / "run.json").write_text(json.dumps(record, indent=2))
    old = "fga-search:/where/the/run/was/created"
    with sqlite3.connect(run / "study.db") as db:
        db.execute("UPDATE studies SET study_name = ?", (old,))
    if extra_study:  # what the old code left when resumed here: a second, empty study, by this path
        import optuna

        storage = f"sqlite:///{run / 'study.db'}"
        with sqlite3.connect(run / "study.db") as db:
            db.execute("UPDATE studies SET study_name = ?", (f"fga-search:{run}",))
        optuna.create_study(storage=storage, study_name=old, directions=["maximize", "minimize"])
        old, empty = f"fga-search:{run}", old
    before = finished(run)
    search(out=str(run), trials=5, **SEARCH)  # type: ignore[arg-type]
    after = finished(run)
    assert len(after) == 5
    same_rows(before, after)
    with sqlite3.connect(run / "study.db") as db:
        counts = dict(
            db.execute(
                "SELECT s.study_name, COUNT(t.trial_id) FROM studies s LEFT JOIN trials t USING (study_id) GROUP BY 1"
            )
        )
    assert counts[old] == 5
    if extra_study:
        assert counts == {old: 5, empty: 0}
    else:
        assert list(counts) == [old]


# -- 3. a damaged study.db is refused, and nothing is overwritten ----------------------------
def _damage(kind: str, study: Path) -> None:
    data = study.read_bytes()
    if kind == "empty":
        study.write_bytes(b"")
    elif kind == "truncated":
        study.write_bytes(data[: len(data) // 2])
    elif kind == "random":
        study.write_bytes(os.urandom(len(data)))
    elif kind == "missing":
        study.unlink()
    elif kind == "other study":  # a valid study.db of another run, with no trials
        import optuna

        study.unlink()
        optuna.create_study(storage=f"sqlite:///{study}", study_name="fga-search:x", directions=["maximize"])


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        (
            "empty",
            "study.db does not hold the run's study: trials.parquet records 3 finished trial(s) and the study is empty",
        ),
        ("truncated", "study.db is not a readable Optuna study (database disk image is malformed)"),
        ("random", "study.db is not a readable Optuna study (file is not a database)"),
        ("missing", "study.db does not hold the run's study"),
        ("other study", "study.db does not hold the run's study"),
    ],
)
def test_a_damaged_study_is_refused_and_nothing_is_overwritten(
    base_run: Path,
    tmp_path: Path,
    in_home: Path,
    capsys: pytest.CaptureFixture[str],
    kind: str,
    message: str,
) -> None:
    run = tmp_path / "run"
    shutil.copytree(base_run, run, symlinks=True)
    _damage(kind, run / "study.db")
    if kind == "other study":  # run.json of a run created before it recorded the study's name
        record = json.loads((run / "run.json").read_text())
        del record["study_name"]
        (run / "run.json").write_text(json.dumps(record))
    before = _tree(run)
    assert {"run.json", "trials.parquet", "report.html", "report.md"} <= set(before)
    capsys.readouterr()
    code = main(["--out", str(run), "--trials", "5", *CLI])
    _one_line_error(code, capsys.readouterr().err, f"run folder {run}: {message}")
    after = _tree(run)
    after.pop(".lock", None)
    before.pop(".lock", None)
    assert after == before  # study.db, trials.parquet, run.json and the reports byte for byte


# -- 1. export never deletes what it did not write ------------------------------------------
def test_export_refuses_a_folder_that_holds_someone_elses_spec_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = fake_run(tmp_path / "run", [digits_trial(0, PLAN, val_acc=0.97)])
    cases: list[tuple[str, dict[str, bytes | None]]] = [
        ("theirs", {"spec.json": b"{}\n", "thesis.txt": b"t\n", "bench": None, "bench/data.csv": b"1,2\n"}),
        ("garbage", {"spec.json": b"\x00\xff not json", "model.pt": b"x"}),
        # our format marker, but no model.pt: not provably an export of ours
        ("no weights", {"spec.json": json.dumps({"format": "fga-search-export/1"}).encode(), "notes": b"n"}),
        # an export of ours, but a folder stands where the export writes one of its files
        (
            "blocked",
            {
                "spec.json": json.dumps({"format": "fga-search-export/1"}).encode(),
                "model.pt": b"w",
                "model.onnx": None,
                "model.onnx/keep.txt": b"k",
            },
        ),
    ]
    for name, files in cases:
        out = tmp_path / name
        out.mkdir()
        for rel, content in files.items():
            if content is None:
                (out / rel).mkdir()
            else:
                (out / rel).write_bytes(content)
        before = _tree(out)
        capsys.readouterr()
        code = main(["export", str(run), "--out", str(out), "--format", "onnx", "--latency-runs", "0"])
        _one_line_error(code, capsys.readouterr().err, f"--out {out} ")
        assert _tree(out) == before, name
    assert sorted(os.listdir(tmp_path)) == ["blocked", "garbage", "no weights", "run", "theirs"]


@pytest.fixture(scope="module")
def exported(home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real export (model.pt, spec.json and model.onnx) of a finished run."""
    run = tmp_path_factory.mktemp("export-run") / "run"
    out = tmp_path_factory.mktemp("exports") / "exported"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        search(out=str(run), trials=2, **SEARCH)  # type: ignore[arg-type]
        export(str(run), out=str(out), formats=("onnx",), latency_runs=0, quiet=True)
    assert sorted(os.listdir(out)) == ["model.onnx", "model.pt", "spec.json"]
    return out


def test_export_over_an_earlier_export_replaces_only_its_own_files(
    exported: Path, tmp_path: Path, in_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "exported"
    shutil.copytree(exported, out)
    spec = json.loads((out / "spec.json").read_text())
    (out / "notes.txt").write_text("mine")
    (out / "bench").mkdir()
    (out / "bench" / "results.csv").write_text("1,2\n")
    old_weights = (out / "model.pt").read_bytes()
    code = main(
        [
            "export",
            spec["source"]["run_dir"],
            "--out",
            str(out),
            "--format",
            "torchscript",
            "--latency-runs",
            "0",
        ]
    )
    assert code == 0, capsys.readouterr().err
    # the earlier export's model.onnx (listed in its spec.json) is gone; the user's files stay
    assert sorted(os.listdir(out)) == ["bench", "model.pt", "model.torchscript.pt", "notes.txt", "spec.json"]
    assert (out / "notes.txt").read_text() == "mine" and (
        out / "bench" / "results.csv"
    ).read_text() == "1,2\n"
    new = json.loads((out / "spec.json").read_text())
    assert set(new["files"]) == {"model.pt", "model.torchscript.pt"}
    assert new["files"]["model.pt"]["bytes"] == len((out / "model.pt").read_bytes())
    assert len(old_weights) > 0
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".fga-export")]  # no staging left
    with pytest.raises(ValueError, match="trust_model_code=True"):  # a user model: the caller trusts it
        load_exported(out)
    load_exported(out, trust_model_code=True)


# -- 4. loading an export runs no code that spec.json names ----------------------------------
EVIL = """
import pathlib

from helpers import odd_pool_cnn

pathlib.Path(__file__).with_name("imported").write_text("imported")


def factory(num_classes=10):
    pathlib.Path(__file__).with_name("called").write_text("called")
    return odd_pool_cnn(num_classes)
"""


def test_load_exported_imports_nothing_that_spec_json_names(
    exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "exported"
    shutil.copytree(exported, out)
    code_dir = tmp_path / "code"
    code_dir.mkdir()
    (code_dir / "evil.py").write_text(EVIL)
    monkeypatch.syspath_prepend(str(code_dir))
    monkeypatch.delitem(sys.modules, "evil", raising=False)
    spec = json.loads((out / "spec.json").read_text())
    assert spec["model"]["name"] == MODEL
    spec["model"] = {
        "source": "zoo",
        "name": "evil:factory",
        "space": "default",
    }  # a lie about its source too
    (out / "spec.json").write_text(json.dumps(spec))
    for path in (out, out / "spec.json"):
        with pytest.raises(ValueError) as exc:
            load_exported(path)
        message = str(exc.value)
        assert (
            "'evil:factory'" in message and "model_factory=" in message and "trust_model_code=True" in message
        )
        assert "\n" not in message
    assert not (code_dir / "imported").exists() and not (code_dir / "called").exists()
    assert "evil" not in sys.modules
    # the caller's own factory: spec.json's name is not imported either
    from helpers import odd_pool_cnn

    model = load_exported(out, model_factory=odd_pool_cnn)
    assert not (code_dir / "imported").exists() and "evil" not in sys.modules
    # opted in: the named factory is imported and called
    trusted = load_exported(out, trust_model_code=True)
    assert (code_dir / "imported").exists() and (code_dir / "called").exists()
    import torch

    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(trusted(x), model(x))
    for bad in ("yes", 1):
        with pytest.raises(ValueError, match=f"trust_model_code must be True or False, got {bad!r}"):
            load_exported(out, trust_model_code=bad)  # type: ignore[arg-type]


def test_load_exported_builds_zoo_and_torchvision_names_without_opting_in(tmp_path: Path) -> None:
    import torch

    from fga_search import build_model

    for name, shape in (("digits_cnn", (1, 1, 8, 8)), ("resnet18", (1, 3, 32, 32))):
        folder = tmp_path / name
        folder.mkdir()
        model = build_model(name, num_classes=10)
        torch.save(model.state_dict(), folder / "model.pt")
        spec = {"format": "fga-search-export/1", "model": {"name": name}, "plan": {}, "num_classes": 10}
        (folder / "spec.json").write_text(json.dumps(spec))
        x = torch.randn(*shape)
        with torch.no_grad():
            torch.testing.assert_close(load_exported(folder)(x), model.eval()(x))


def test_the_resume_check_names_a_storage_without_its_password(tmp_path: Path) -> None:
    """check_resumable's storage error shows the URL as open_study does: password redacted."""
    from types import SimpleNamespace

    from fga_search.engine._study import check_resumable
    from fga_search.runs._runfolder import RunFolder

    config = SimpleNamespace(study_name="s", storage="postgresql://u:secret@127.0.0.1:1/db")
    with pytest.raises(ValueError, match="cannot open the Optuna storage") as info:
        check_resumable(RunFolder(str(tmp_path)), config)  # type: ignore[arg-type]
    message = str(info.value)
    assert "secret" not in message and "postgresql://u:***@127.0.0.1:1/db" in message
    assert "\n" not in message
