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
