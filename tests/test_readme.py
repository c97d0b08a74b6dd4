from __future__ import annotations

import os
import re
import runpy
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO


def test_quickstart_has_exactly_two_commands() -> None:
    text = (REPO / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```bash\n(.*?)```", section, re.S)[0]
    commands = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2
    assert commands[0].endswith("fga-search --budget 0.2")
    # the second one installs what the tests need (system packages too), then runs pytest
    assert commands[1] == "scripts/test.sh"
    script = (REPO / "scripts" / "test.sh").read_text().splitlines()
    assert script[-1] == 'exec .venv/bin/python -m pytest "$@"'


def test_python_api_example_runs(
    shared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (REPO / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    script = tmp_path / "readme_example.py"
    script.write_text(code)
    monkeypatch.chdir(REPO)  # the example names ../shared relative to the repository root
    runpy.run_path(str(script))
    out = capsys.readouterr().out
    assert "125.5 M MACs ->" in out
    assert "\nTrue\n" in out


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors for a Markdown file's headings."""
    anchors = set()
    for heading in re.findall(r"^#{1,6} (.+)$", markdown, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def test_docs_links_resolve() -> None:
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    checked = 0
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # links in code are not links
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path) if path else page
            assert dest.exists(), f"{page.name}: {target} does not exist"
            if anchor:
                assert anchor in _anchors(dest.read_text()), f"{page.name}: no heading for {target}"
            checked += 1
    assert checked >= 20  # the README and every docs page link to each other


def test_docs_sizes_and_pages() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert len((REPO / "docs" / "results.md").read_text().splitlines()) <= 300
    for page in ("method", "search", "latency", "ray", "export", "results"):
        assert f"(docs/{page}.md)" in readme, page


def _fake_checkout(tmp: Path) -> tuple[Path, Path, dict[str, str]]:
    """scripts/test.sh in a checkout whose system package, apt-get, sudo and .venv are stubs that
    log their calls: the system package's file is missing until the stub apt-get installs it."""
    repo, bin_dir = tmp / "repo", tmp / "bin"
    (repo / "scripts").mkdir(parents=True)
    (repo / ".ci").mkdir()
    (repo / ".venv" / "bin").mkdir(parents=True)
    bin_dir.mkdir()
    shutil.copy(REPO / "scripts" / "test.sh", repo / "scripts" / "test.sh")
    (repo / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    installed = tmp / "system" / "usr-bin-browser"
    (repo / ".ci" / "system-packages").write_text(f"# comment\n\nfake-browser {installed}\n")
    stubs = {
        bin_dir / "apt-get": f'echo "apt-get $DEBIAN_FRONTEND $*" >> "$LOG"\n'
        f'case " $* " in *" install "*) mkdir -p {installed.parent} && touch {installed} ;; esac',
        bin_dir / "sudo": '"$@"',
        repo / ".venv" / "bin" / "pip": 'echo "pip $*" >> "$LOG"',
        repo / ".venv" / "bin" / "python": 'echo "python $*" >> "$LOG"\nexit "${PYTEST_RC:-0}"',
    }
    for path, body in stubs.items():
        path.write_text(f"#!/usr/bin/env bash\n{body}\n")
        path.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(tmp / "log")}
    return repo, tmp / "log", env


def test_the_test_command_installs_what_is_missing_once_then_runs_pytest_with_its_arguments(
    tmp_path: Path,
) -> None:
    repo, log, env = _fake_checkout(tmp_path)

    def run(*args: str, rc: int = 0) -> list[str]:
        log.write_text("")
        proc = subprocess.run(
            ["bash", "scripts/test.sh", *args],
            cwd=repo,
            env={**env, "PYTEST_RC": str(rc)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == rc, proc.stderr
        return log.read_text().splitlines()

    assert run("-m", "not slow", "tests/test_x.py") == [
        "apt-get noninteractive -o DPkg::Lock::Timeout=600 -qq update",
        "apt-get noninteractive -o DPkg::Lock::Timeout=600 -qq install -y --no-install-recommends fake-browser",
        "pip install -q --no-compile -e .[test]",
        "python -m compileall -q -j 0 .venv/lib",
        "python -m pytest -m not slow tests/test_x.py",
    ]
    # everything there: straight to the tests, whose exit status is the command's
    assert run("-x", rc=3) == ["python -m pytest -x"]
    # a changed pyproject.toml reinstalls the package, nothing else
    (repo / "pyproject.toml").write_text("[project]\nname = 'y'\n")
    assert run() == [
        "pip install -q --no-compile -e .[test]",
        "python -m compileall -q -j 0 .venv/lib",
        "python -m pytest",
    ]
    assert run() == ["python -m pytest"]


def test_the_test_command_stops_when_apt_get_does_not_install_the_file(tmp_path: Path) -> None:
    repo, log, env = _fake_checkout(tmp_path)
    (tmp_path / "bin" / "apt-get").write_text('#!/usr/bin/env bash\necho "apt-get $*" >> "$LOG"\n')
    proc = subprocess.run(
        ["bash", "scripts/test.sh"], cwd=repo, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == (
        f"scripts/test.sh: {tmp_path / 'system' / 'usr-bin-browser'} still missing after apt-get install fake-browser"
    )
    assert [line.split()[-1] for line in log.read_text().splitlines()] == ["update", "fake-browser"]
