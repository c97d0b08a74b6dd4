from __future__ import annotations

import re
import runpy
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
    assert "pytest" in commands[1]


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
