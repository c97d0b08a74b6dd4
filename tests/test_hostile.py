"""Hostile input: each case must end in exit code 2, one line on stderr naming the problem, no
traceback, and no file created or changed outside what the command owns (the caches of decoded
datasets and the quickstart model live in XDG_CACHE_HOME, outside the folders compared here).

Issue 30, items 5-11, as reproductions; then cases generated systematically (hypothesis) and
file-system cases (a file for a folder, a read-only folder, a long name, a full disk)."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import struct
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fga_search._cli import main
from fga_search._util import _atomic
from fga_search._util._storage import redact_command, redact_url
from fga_search.core._plan import load_plan
from fga_search.data._data import load_dataset
from fga_search.engine._space import load_space
from fga_search.models._checkpoint import WeightsError, load_state_dict_file, load_weights
from helpers import digits_trial, fake_run, rows, run_cli

# a real search, as small as one gets: an untrained digits CNN, no fine-tuning, two trials
FAST = ["--model", "digits_cnn", "--epochs", "0", "--trials", "2", "--quiet", "--front-latency-runs", "0"]
PLAN = {"features.3": [8, 5], "features.6": [8, 2], "features.10": [8, 8], "features.13": [4, 3]}
HYPOTHESIS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and modification time; folders by their existence
    only (a folder made and removed again leaves its parent's time changed, and nothing else)."""
    out = {}
    for p in sorted(root.rglob("*")):
        st_ = p.lstat()
        out[str(p.relative_to(root))] = (st_.st_size, st_.st_mtime_ns) if p.is_file() else (-1, 0)
    return out


def call(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``main(argv)`` in this process: (exit code, stdout, stderr); argparse's exit included."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def refused(argv: list[str], capsys: pytest.CaptureFixture[str], root: Path, *needles: str) -> str:
    """Run ``argv`` and check the rule: exit 2, one line naming the problem, no traceback, and
    nothing under ``root`` created or changed. Returns the line."""
    before = snapshot(root)
    code, out, err = call(argv, capsys)
    assert code == 2, (code, out, err)
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("fga-search: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert snapshot(root) == before, "the refused command wrote or changed files"
    return err.strip()


def write_png(path: Path, mode: str = "RGB", size: int = 8, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def image_tree(root: Path, per_class: dict[str, int], *, mode: str = "RGB", test: int = 2) -> Path:
    """An ImageFolder tree: train/<class>/ with the given counts, test/<class>/ with ``test`` each."""
    seed = 0
    for split, counts in (("train", per_class), ("test", dict.fromkeys(per_class, test))):
        for cls, n in counts.items():
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                seed += 1
                write_png(folder / f"{i}.png", mode, seed=seed)
    return root


def factory_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, source: str) -> None:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))


@contextlib.contextmanager
def tmpfs(path: Path, *options: str) -> Iterator[Path]:
    """A small tmpfs mounted at ``path`` (root only); the test is skipped where mounting fails."""
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or result.returncode})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# -- item 5: a YAML alias bomb ------------------------------------------------------------------
ALIAS_BOMB = (
    'a: &a ["x","x","x","x","x","x","x","x","x"]\n'
    "b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
    "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
    "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
    "e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
    "f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n"
    "g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\n"
    "skip: [*g,*g,*g,*g,*g,*g,*g,*g,*g]\n"
)


def test_yaml_alias_bomb_is_refused_before_it_expands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    space = tmp_path / "bomb.yaml"
    space.write_text(ALIAS_BOMB)
    assert len(ALIAS_BOMB) < 400
    with pytest.raises(ValueError, match=r"space 'bomb' uses YAML aliases"):
        load_space(str(space))
    line = refused([*FAST, "--space", str(space), "--out", str(tmp_path / "run")], capsys, tmp_path)
    assert "uses YAML aliases" in line and len(line) < 200


def test_space_errors_do_not_repeat_huge_values(tmp_path: Path) -> None:
    space = tmp_path / "big.yaml"
    space.write_text(yaml.safe_dump({"groups": ["x" * 100_000]}))
    with pytest.raises(ValueError) as exc:
        load_space(str(space))
    assert "group count 'xxxx" in str(exc.value) and len(str(exc.value)) < 300


# -- item 6: the decoded-dataset cache and relabelled images -----------------------------------
def test_dataset_cache_sees_images_moved_between_classes(tmp_path: Path) -> None:
    root = image_tree(tmp_path / "data", {"a": 6, "b": 6})
    first = load_dataset("imagefolder", data_dir=str(root), val_fraction=0.5, seed=0)
    counts = torch.bincount(torch.cat([first.train.labels, first.val.labels]), minlength=2).tolist()
    assert counts == [6, 6]
    for i in range(3):  # a rename keeps size and time: only the file list and classes change
        os.rename(root / "train" / "a" / f"{i}.png", root / "train" / "b" / f"moved{i}.png")
    second = load_dataset("imagefolder", data_dir=str(root), val_fraction=0.5, seed=0)
    counts = torch.bincount(torch.cat([second.train.labels, second.val.labels]), minlength=2).tolist()
    assert counts == [3, 9]


# -- item 7: tracebacks where one line and exit 2 are promised --------------------------------
@pytest.mark.parametrize(
    "content",
    [
        os.urandom(4096),
        b"just some text\nin a .pt file\n",
        b"",
        b"PK\x03\x04" + bytes(300),
        b"\x80\x02}q\x00.",
    ],
    ids=["random", "text", "empty", "zip-header", "pickle-header"],
)
def test_unreadable_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes) -> None:
    weights = tmp_path / "w.pt"
    weights.write_bytes(content)
    line = refused(
        [*FAST, "--weights", str(weights), "--out", str(tmp_path / "run")], capsys, tmp_path, "weights"
    )
    assert "weights_only=False" not in line and "weights_only" not in line.replace("weights-only", "")


def test_weights_with_code_never_suggest_weights_only_false(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (print, ("this ran",))

    path = tmp_path / "evil.pt"
    torch.save({"w": Payload()}, path)
    with pytest.raises(WeightsError) as exc:
        load_state_dict_file(path)
    assert "weights_only=False" not in str(exc.value) and "\n" not in str(exc.value)
    assert "holds objects other than tensors" in str(exc.value)


def bomb_png(path: Path, width: int = 20000, height: int = 20000) -> None:
    """A valid PNG header declaring a huge image (with a tiny payload): a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1))  # one row; the rest is missing
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.mark.parametrize("bad", ["corrupt.jpg", "bomb.png", "truncated.png"])
def test_unreadable_images(tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str) -> None:
    root = image_tree(tmp_path / "data", {"a": 4, "b": 4})
    path = root / "train" / "b" / bad
    if bad == "corrupt.jpg":
        path.write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(500))
    elif bad == "bomb.png":
        bomb_png(path)
    else:
        write_png(path)
        path.write_bytes(path.read_bytes()[:40])
    args = ["--model", "resnet20", "--dataset", "imagefolder", "--data-dir", str(root), "--quiet"]
    line = refused([*args, "--out", str(tmp_path / "run")], capsys, tmp_path, "cannot read image")
    assert str(path) in line


@pytest.mark.parametrize(
    ("storage", "needle"),
    [
        ("bogus://x", "no database driver for 'bogus'"),
        ("not a url", "is not a database URL"),
        ("sqlite:////nonexistent/dir/x.db", "folder /nonexistent/dir does not exist"),
        ("sqlite://", "names no SQLite file"),
    ],
)
def test_bad_storage_is_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], storage: str, needle: str
) -> None:
    refused(
        [*FAST, "--storage", storage, "--out", str(tmp_path / "run")], capsys, tmp_path, "--storage", needle
    )


def test_long_out_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    long = str(tmp_path / ("x" * 300))
    nested = str(tmp_path / "a" / "b" / ("y" * 300) / "run")
    for out in (long, nested):
        refused([*FAST, "--out", out], capsys, tmp_path, "over the file system's limit of 255")
    run = fake_run(tmp_path / "run", [])
    refused(["report", str(run), "--out", long], capsys, tmp_path, "--out", "over the file system's limit")
    refused(["export", str(run), "--out", long], capsys, tmp_path, "--out", "over the file system's limit")


def test_models_that_cannot_be_built_or_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    factory_module(
        tmp_path / "mods",
        monkeypatch,
        "hostile_models",
        "from torch import nn\n"
        "def no_classes():\n"
        "    return nn.Conv2d(1, 4, 3)\n"
        "def rgb(num_classes=10):\n"
        "    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.Flatten(), nn.Linear(576, num_classes))\n"
        "def wrong_output(num_classes=10):\n"
        "    return nn.Sequential(nn.Conv2d(1, 16, 3), nn.Flatten())\n",
    )
    out = ["--out", str(tmp_path / "run"), "--epochs", "0", "--quiet"]
    refused(
        ["--model", "os:getcwd", *out], capsys, tmp_path, "model 'os:getcwd': factory(num_classes=10) failed"
    )
    refused(
        ["--model", "hostile_models:no_classes", *out],
        capsys,
        tmp_path,
        "factory(num_classes=10) failed",
        "unexpected keyword argument 'num_classes'",
    )
    refused(
        ["--model", "hostile_models:rgb", *out],
        capsys,
        tmp_path,
        "model 'hostile_models:rgb' fails on the dataset's 1x8x8 images",
    )
    refused(
        ["--model", "hostile_models:wrong_output", *out],
        capsys,
        tmp_path,
        "outputs (2, 576) on the dataset's 1x8x8 images, not (batch, 10) class scores",
    )


def test_full_disk_while_writing_run_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with tmpfs(tmp_path / "disk", "size=256k") as disk:
        filler = disk / "filler"
        with contextlib.suppress(OSError), open(filler, "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        refused([*FAST, "--out", str(disk / "run")], capsys, tmp_path, "no space left on the device")
        assert not (disk / "run").exists()


@pytest.mark.slow
def test_full_disk_during_a_search_then_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """ENOSPC injected at the one atomic-write helper when the first checkpoint is kept."""
    commit = _atomic._commit

    def full(tmp: str, path: str) -> None:
        if path.endswith(".pt") and "trial_" in path:
            raise OSError(errno.ENOSPC, "No space left on device", tmp)
        commit(tmp, path)

    run = tmp_path / "run"
    monkeypatch.setattr(_atomic, "_commit", full)
    code, _, err = call([*FAST, "--out", str(run)], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("fga-search: error: no space left on the device: ") and "Traceback" not in err
    assert not list(run.rglob("*.tmp")), "a temporary file was left behind"
    assert (run / "run.json").is_file()  # the run is kept: its finished trial resumes
    monkeypatch.setattr(_atomic, "_commit", commit)
    code, out, err = call([*FAST, "--out", str(run)], capsys)
    assert code == 0, err
    for path in re.findall(r"weights (\S+\.pt)", out):
        assert os.path.isfile(path), f"printed a weights path that does not exist: {path}"
    assert "best model: trial" in out
    assert not list(run.rglob("*.tmp"))
    assert len(rows(run / "trials.parquet")) == 2


# -- item 8: refused input writes nothing and does not block the corrected rerun ---------------
@pytest.mark.slow
def test_refused_seed_writes_nothing_and_the_corrected_rerun_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    refused([*FAST, "--seed", "-1", "--out", str(run)], capsys, tmp_path, "--seed must be an integer")
    assert not run.exists()
    code, _, err = call([*FAST, "--seed", "0", "--out", str(run)], capsys)
    assert code == 0, err
    assert json.loads((run / "run.json").read_text())["identity"]["seed"] == 0


@pytest.mark.slow
def test_fixed_storage_is_the_one_recorded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    refused([*FAST, "--storage", "bogus://x", "--out", str(run)], capsys, tmp_path)
    good = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    code, _, err = call([*FAST, "--storage", good, "--out", str(run)], capsys)
    assert code == 0, err
    record = json.loads((run / "run.json").read_text())
    assert record["config"]["storage"] == good
    assert "bogus" not in (run / "run.json").read_text()
    assert "bogus" not in (run / "report.md").read_text()


def test_storage_passwords_are_never_written_or_shown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = "postgresql://u:s3cr3t@127.0.0.1:1/db"
    assert redact_url(url) == "postgresql://u:***@127.0.0.1:1/db"
    assert redact_command(["fga-search", "--storage", url, f"--storage={url}"]) == [
        "fga-search",
        "--storage",
        "postgresql://u:***@127.0.0.1:1/db",
        "--storage=postgresql://u:***@127.0.0.1:1/db",
    ]
    assert "s3cr3t" not in redact_url("postgresql://u:s3cr3t@[bad")
    line = refused([*FAST, "--storage", url, "--out", str(tmp_path / "run")], capsys, tmp_path, "--storage")
    assert "s3cr3t" not in line


def test_too_small_for_a_validation_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = image_tree(tmp_path / "data", {"a": 1, "b": 1})
    args = [
        "--model",
        "resnet20",
        "--dataset",
        "imagefolder",
        "--data-dir",
        str(root),
        "--epochs",
        "0",
        "--quiet",
    ]
    line = refused([*args, "--out", str(tmp_path / "run")], capsys, tmp_path, "--val-fraction 0.1")
    assert "leaves 0 for validation" in line and "torch.cat" not in line
    assert not (tmp_path / "run").exists()


# -- item 9: NaN and out-of-range numbers -------------------------------------------------------
@pytest.mark.parametrize(
    ("option", "value", "needle"),
    [
        ("--timeout", "nan", "--timeout must be a number of seconds > 0, got nan"),
        ("--timeout", "inf", "--timeout must be a number of seconds > 0, got inf"),
        ("--lr", "nan", "--lr must be a number > 0, got nan"),
        ("--lr", "inf", "--lr must be a number > 0, got inf"),
        ("--device-data-gb", "nan", "--device-data-gb must be a number >= 0, got nan"),
        ("--seed", str(2**70), f"--seed must be an integer in [0, {2**31 - 1}], got {2**70}"),
        ("--seed", "-1", "--seed must be an integer in [0, "),
    ],
)
def test_nan_and_huge_numbers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: str, needle: str
) -> None:
    refused([*FAST, option, value, "--out", str(tmp_path / "run")], capsys, tmp_path, needle)


# -- item 10: a space file edited in place ------------------------------------------------------
@pytest.mark.slow
def test_space_edited_in_place_is_refused_on_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    space = tmp_path / "space.yaml"
    space.write_text("groups: [1, 2]\n")
    run = tmp_path / "run"
    args = [*FAST, "--space", str(space), "--out", str(run)]
    code, _, err = call(args, capsys)
    assert code == 0, err
    space.write_text("groups: [1, 2, 4]\n")
    before = snapshot(run)
    line = refused(args, capsys, tmp_path / "run", "another content of space", "edited")
    assert str(space) in line
    assert snapshot(run) == before
    assert all(r["state"] != "RUNNING" for r in rows(run / "trials.parquet"))
    space.write_text("groups: [1, 2]\n")  # restored: it resumes
    code, _, err = call([*args[:-2], "--trials", "3", "--out", str(run)], capsys)
    assert code == 0, err


# -- item 11 ------------------------------------------------------------------------------------
def test_one_grayscale_image_among_rgb_ones(tmp_path: Path) -> None:
    root = image_tree(tmp_path / "data", {"a": 4, "b": 4})
    write_png(root / "train" / "a" / "0.png", "L")  # the first file: it used to decide
    data = load_dataset("imagefolder", data_dir=str(root), val_fraction=0.25, seed=0)
    assert data.input_shape == (3, 8, 8) and len(data.train) + len(data.val) == 8
    gray = image_tree(tmp_path / "gray", {"a": 4, "b": 4}, mode="L")
    assert load_dataset("imagefolder", data_dir=str(gray), val_fraction=0.25).input_shape == (1, 8, 8)


def test_one_class_and_empty_class_datasets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one = image_tree(tmp_path / "one", {"a": 6})
    empty = image_tree(tmp_path / "empty", {"a": 6, "b": 6})
    for p in (empty / "train" / "b").iterdir():
        p.unlink()
    args = ["--model", "resnet20", "--dataset", "imagefolder", "--epochs", "0", "--quiet"]
    out = ["--out", str(tmp_path / "run")]
    refused([*args, "--data-dir", str(one), *out], capsys, tmp_path, "one class folder ('a')")
    refused(
        [*args, "--data-dir", str(empty), *out],
        capsys,
        tmp_path,
        f"class folder {empty / 'train' / 'b'} has no image",
    )


def test_empty_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    refused([*FAST, "--out", ""], capsys, tmp_path, "--out must be a folder path, got ''")
    run = fake_run(tmp_path / "run", [])
    refused(["report", str(run), "--out", ""], capsys, tmp_path, "--out must be a folder path")
    refused(["export", str(run), "--out", " "], capsys, tmp_path, "--out must be a folder path")
    assert not (tmp_path / "runs").exists()


# -- a subprocess: what a user sees, warnings included -----------------------------------------
@pytest.mark.slow
def test_as_a_user_runs_it(tmp_path: Path) -> None:
    weights = tmp_path / "w.pt"
    weights.write_bytes(os.urandom(1000))
    space = tmp_path / "bomb.yaml"
    space.write_text(ALIAS_BOMB)
    before = snapshot(tmp_path)
    for args in (
        [*FAST, "--weights", str(weights)],
        [*FAST, "--space", str(space)],
        [*FAST, "--storage", "bogus://x"],
    ):
        result = run_cli([*args, "--out", str(tmp_path / "run")], home=tmp_path, timeout=300)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith("fga-search: error: ") and not result.stdout
    assert snapshot(tmp_path) == before


# == systematic cases ===========================================================================
# Each numeric option with any text: refused (naming the option) when invalid; otherwise the
# command goes on to the next check, an unknown --dataset, which refuses it.
_FLOAT, _INT = float, int
NUMERIC = {
    "--budget": (_FLOAT, lambda v: math.isfinite(v) and 0 < v <= 1),
    "--timeout": (_FLOAT, lambda v: math.isfinite(v) and v > 0),
    "--lr": (_FLOAT, lambda v: math.isfinite(v) and v > 0),
    "--epochs": (_FLOAT, lambda v: math.isfinite(v) and v >= 0),
    "--val-fraction": (_FLOAT, lambda v: 0 < v < 1),
    "--device-data-gb": (_FLOAT, lambda v: math.isfinite(v) and v >= 0),
    "--cpus-per-trial": (_FLOAT, lambda v: math.isfinite(v) and v > 0),
    "--seed": (_INT, lambda v: 0 <= v <= 2**31 - 1),
    "--trials": (_INT, lambda v: v >= 1),
    "--population": (_INT, lambda v: v >= 2),
    "--batch-size": (_INT, lambda v: v >= 1),
    "--workers": (_INT, lambda v: v >= 0),
    "--train-limit": (_INT, lambda v: v >= 1),
    "--image-size": (_INT, lambda v: v >= 1),
    "--front-latency-runs": (_INT, lambda v: v == 0 or v >= 10),
}
_ARGPARSE_NEGATIVE = re.compile(r"^-\d+$|^-\d*\.\d+$")
numbers_as_text = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-(2**80), max_value=2**80).map(str),
    st.sampled_from(
        ["nan", "-nan", "inf", "-inf", "1e309", "", " ", "0x10", "1_0", "\uff11", "1e-320", "0.0"]
    ),
    st.text(max_size=6),
)


@pytest.mark.parametrize("option", sorted(NUMERIC))
@HYPOTHESIS
@given(value=numbers_as_text)
def test_numeric_options(tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: str) -> None:
    kind, valid = NUMERIC[option]
    # argparse takes it for an option, except a lone "-", a negative number and text with a space
    if value.startswith("-") and len(value) > 1 and " " not in value and not _ARGPARSE_NEGATIVE.match(value):
        needle = f"argument {option}: expected one argument"
    else:
        try:
            parsed = kind(value)
        except ValueError:
            needle = f"argument {option}: invalid {kind.__name__} value"
        else:
            needle = "unknown dataset 'nope'" if valid(parsed) else f"{option} "
    if "\0" in value:
        return  # a command line cannot hold a NUL byte
    refused([option, value, "--dataset", "nope", "--out", str(tmp_path / "run")], capsys, tmp_path, needle)


def _one_line_value_error(exc: BaseException) -> None:
    assert isinstance(exc, ValueError), f"{type(exc).__name__}: {exc}"
    text = str(exc)
    assert text and "\n" not in text and len(text) < 1000, text


space_keys = st.sampled_from(
    ["skip", "groups", "rank", "pointwise", "overrides", "low", "high", "log", "match", "x", "1"]
)
yaml_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=10),
)
yaml_values = st.recursive(
    yaml_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(space_keys, inner, max_size=4)),
    max_leaves=20,
)


@HYPOTHESIS
@given(data=st.dictionaries(space_keys, yaml_values, max_size=5) | yaml_values)
def test_space_yaml_structures(tmp_path: Path, data: object) -> None:
    from fga_search import build_model
    from fga_search.core._flops import ModelProfile

    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        space = load_space(str(path))
        profile = ModelProfile(build_model("digits_cnn", num_classes=10), input_shape=(1, 8, 8))
        space.resolve(profile.layers)
    except Exception as exc:
        _one_line_value_error(exc)


@HYPOTHESIS
@given(text=st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_space_yaml_text(tmp_path: Path, text: str) -> None:
    path = tmp_path / "space.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_space(str(path))
    except Exception as exc:
        _one_line_value_error(exc)


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(), st.text(max_size=8)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=15,
)


@HYPOTHESIS
@given(
    data=json_values
    | st.dictionaries(
        st.sampled_from(["features.0", "features.3", "x"]),
        st.one_of(st.just("keep"), st.lists(st.integers(-3, 70), max_size=3), json_values),
        max_size=3,
    )
)
def test_plans(data: object) -> None:
    from fga_search import build_model
    from fga_search.core._flops import ModelProfile

    profile = ModelProfile(build_model("digits_cnn", num_classes=10), input_shape=(1, 8, 8))
    try:
        plan = load_plan(json.dumps(data))
        profile.count(plan)
    except Exception as exc:
        _one_line_value_error(exc)


@HYPOTHESIS
@given(
    content=st.binary(max_size=600)
    | st.tuples(
        st.sampled_from([b"PK\x03\x04", b"\x80\x02", b"\x80\x04", b"\x93NUMPY"]), st.binary(max_size=300)
    ).map(lambda t: t[0] + t[1])
)
def test_weights_bytes(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "w.pt"
    path.write_bytes(content)
    with pytest.raises(WeightsError) as exc:
        load_state_dict_file(path)
    _one_line_value_error(exc.value)
    assert "weights_only=False" not in str(exc.value)


saved_values = st.recursive(
    st.one_of(
        st.integers(-5, 5),
        st.text(max_size=5),
        st.builds(torch.zeros, st.integers(0, 3)),
        st.just(torch.tensor([float("nan")])),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=10,
)


@HYPOTHESIS
@given(obj=saved_values)
def test_weights_objects(tmp_path: Path, obj: object) -> None:
    from fga_search import build_model

    path = tmp_path / "w.pt"
    torch.save(obj, path)
    try:
        state = load_state_dict_file(path)
        load_weights(build_model("digits_cnn", num_classes=10), state)
    except Exception as exc:
        _one_line_value_error(exc)


# -- the file system ----------------------------------------------------------------------------
def test_a_file_where_a_folder_belongs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    refused([*FAST, "--out", str(afile)], capsys, tmp_path, "--out", "not a folder")
    refused([*FAST, "--out", str(afile / "run")], capsys, tmp_path, "--out", "not a folder")
    refused(
        [
            "--model",
            "resnet20",
            "--dataset",
            "imagefolder",
            "--data-dir",
            str(afile),
            "--out",
            str(tmp_path / "r"),
        ],
        capsys,
        tmp_path,
        "data dir",
    )
    refused([*FAST, "--space", str(tmp_path), "--out", str(tmp_path / "r")], capsys, tmp_path, "space")
    refused([*FAST, "--weights", str(tmp_path), "--out", str(tmp_path / "r")], capsys, tmp_path, "weights")
    run = fake_run(tmp_path / "run", [digits_trial(0, PLAN, val_acc=0.97)])
    refused(["report", str(afile)], capsys, tmp_path)
    refused(["report", str(run), "--out", str(afile)], capsys, tmp_path, "not a folder")
    refused(["export", str(afile), "--out", str(tmp_path / "exp")], capsys, tmp_path)


def test_a_read_only_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = fake_run(tmp_path / "run", [digits_trial(0, PLAN, val_acc=0.97)])
    with tmpfs(tmp_path / "ro", "size=64k", "ro") as ro:
        refused([*FAST, "--out", str(ro / "run")], capsys, tmp_path, "cannot write in")
        refused(["report", str(run), "--out", str(ro / "rep")], capsys, tmp_path, "cannot write in")
        refused(["export", str(run), "--out", str(ro / "exp")], capsys, tmp_path)


spec_fields = st.fixed_dictionaries(
    {"format": st.just("fga-search-export/1")},
    optional={
        "model": st.one_of(
            json_values, st.fixed_dictionaries({"name": st.sampled_from(["digits_cnn", "", "nope"])})
        ),
        "num_classes": st.one_of(st.integers(-3, 2**70), json_values),
        "plan": st.one_of(json_values, st.just({}), st.just(PLAN)),
        "bn_fold": st.one_of(
            json_values, st.fixed_dictionaries({"kept": st.booleans(), "pairs": json_values})
        ),
        "cpu_execution": st.one_of(json_values, st.fixed_dictionaries({"layers": json_values})),
    },
)


@HYPOTHESIS
@given(spec=spec_fields | json_values)
def test_spec_json(tmp_path: Path, spec: object) -> None:
    from fga_search import load_exported

    folder = tmp_path / "exported"
    folder.mkdir(exist_ok=True)
    torch.save({}, folder / "model.pt")
    (folder / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(Exception) as exc:  # an empty model.pt never fits
        load_exported(folder)
    _one_line_value_error(exc.value)


def test_a_second_process_on_a_run_folder_in_use(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The first process made the folder and holds its lock: the second is refused and removes
    nothing of it (it did not make the folder)."""
    import fcntl

    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        refused([*FAST, "--out", str(run)], capsys, tmp_path, "is in use by another fga-search process")
    assert (run / ".lock").is_file()
