from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.parquet as pq
import pytest

from fga_search._cli import main
from fga_search.report._report import write_report
from fga_search.report._report_doc import fmt_seconds, markdown_table
from fga_search.runs._pareto import hypervolume
from helpers import digits_trial, fake_run, rows

CHROMEDRIVER = "/usr/bin/chromedriver"
CHROME_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
PLANS = [
    {"features.3": [1, 1], "features.6": [2, 1], "features.10": [4, 1], "features.13": [8, 1]},
    {"features.3": [8, 5], "features.6": [8, 2], "features.10": [8, 8], "features.13": [4, 3]},
    {"features.3": [1, 7], "features.6": [4, 2], "features.10": [4, 14], "features.13": [4, 5]},
    {"features.6": [4, 4], "features.13": [8, 4]},
]


@pytest.fixture
def synthetic(tmp_path: Path) -> Path:
    """A hand-written run folder: 3 trained trials, one infeasible, one failed, one running."""
    trials = [
        digits_trial(0, PLANS[0], val_acc=0.93, seconds_total=2.0),
        digits_trial(1, PLANS[1], val_acc=0.98, seconds_total=3.0),
        digits_trial(2, PLANS[2], val_acc=0.97, seconds_total=3.0),
        digits_trial(3, PLANS[3], status="infeasible", within_budget=False, fail_reason="over budget"),
        digits_trial(4, PLANS[0], state="FAIL", status="failed", fail_reason="FloatingPointError: nan"),
        digits_trial(5, PLANS[1], state="RUNNING", status="running"),
    ]
    for i, row in enumerate(trials):
        row["datetime_start"] = f"2026-01-01T00:00:{10 * i:02d}"
        if row["state"] != "RUNNING":
            row["datetime_complete"] = f"2026-01-01T00:00:{10 * i + 5:02d}"
    return fake_run(tmp_path / "run", trials)


def _browser(log_dir: str) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={log_dir}")
    options.add_argument("--window-size=1280,1000")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@pytest.mark.slow
def test_report_renders_offline_in_chromium(run_dir: Path, tmp_path: Path) -> None:
    if not os.path.exists(CHROMEDRIVER):
        pytest.fail(
            f"{CHROMEDRIVER} missing: apt-get install chromium chromium-driver (see .ci/system-packages)"
        )
    html_path, md_path = write_report(str(run_dir))
    assert html_path == str(run_dir / "report.html") and md_path == str(run_dir / "report.md")
    url = Path(html_path).as_uri()
    driver = _browser(tempfile.mkdtemp(dir=tmp_path))
    try:
        driver.get(url)
        assert driver.execute_script("return document.readyState") == "complete"
        plot = driver.find_element("id", "plot-pareto-flops")
        width = driver.execute_script("return arguments[0].naturalWidth", plot)
        height = driver.execute_script("return arguments[0].naturalHeight", plot)
        assert width > 400 and height > 200, (width, height)
        for name in ("pareto-params", "hypervolume"):
            img = driver.find_element("id", f"plot-{name}")
            assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) > 0
        members = driver.find_elements("css selector", "table#members tbody tr")
        front = rows(run_dir / "pareto.parquet")
        assert len(members) == len(front) >= 1
        shown = [tr.find_element("css selector", "td").text for tr in members]
        assert shown == [str(r["trial"]) for r in front]
        layers = driver.find_elements("css selector", "table#layers thead th")
        assert len(layers) == 3 + len(front)  # layer, shape, share, then one column per member
        page_height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1280, page_height + 150)
        shot = tmp_path / "report.png"
        assert driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 20_000
        console = driver.get_log("browser")
        assert console == [], console
        requests = []
        for entry in driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                requests.append(
                    (message["params"].get("documentURL", ""), message["params"]["request"]["url"])
                )
    finally:
        driver.quit()
    ours = [u for doc, u in requests if doc == url or u == url]
    assert url in ours
    assert all(urlparse(u).scheme in ("file", "data") for u in ours), ours
    # whatever the browser itself did (its start page), nothing went to the network
    assert not [u for _, u in requests if urlparse(u).scheme in ("http", "https", "ws", "wss", "ftp")]


@pytest.mark.slow
def test_report_content_is_the_runs_numbers(run_dir: Path) -> None:
    html_path, md_path = write_report(str(run_dir))
    text = Path(html_path).read_text()
    # self-contained: every src/href is inline data, no script, no external style sheet
    refs = re.findall(r'(?:src|href)="([^"]*)"', text)
    assert refs and all(r.startswith("data:") for r in refs), refs
    assert "<script" not in text and "@import" not in text and "url(" not in text
    assert len(re.findall(r'src="data:image/png;base64,', text)) == 3  # FLOPs, params, hypervolume
    md = Path(md_path).read_text()
    for name in ("pareto-flops", "pareto-params", "hypervolume"):
        png = run_dir / "report_files" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"(report_files/{name}.png)" in md
    record = json.loads((run_dir / "run.json").read_text())
    trials = rows(run_dir / "trials.parquet")
    front = rows(run_dir / "pareto.parquet")
    done = [r for r in trials if r["state"] == "COMPLETE" and r["status"] in ("ok", "duplicate")]
    feasible = [r for r in done if r["within_budget"]]
    hv = hypervolume([r["val_acc"] for r in feasible], [r["flops_ratio"] for r in feasible], ref=(0.0, 1.0))
    assert hv > 0.5
    assert f"| hypervolume | {hv:.4f} |" in md
    assert f"| trials | {len(trials)} finished of 8 asked: {len(done)} trained" in md
    device = sum(r["seconds_total"] for r in trials if r["seconds_total"] is not None)
    assert (
        device > 0
        and f"| device time | {fmt_seconds(device)} (sum of the trials' seconds_total) on cpu |" in md
    )
    base = record["baseline"]
    assert f"| digits_cnn | {100 * base['val_acc']:.2f} % | {100 * base['test_acc']:.2f} % | 1.78 M |" in md
    best = next(r for r in front if r["is_best"])
    knee = next(r for r in front if r["is_knee"])
    members = md.split("## Front members", 1)[1].split("\n\n", 2)[1].splitlines()
    assert len(members) == 2 + len(front)
    line = next(m for m in members if m.startswith(f"| {best['trial']} |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert "best" in cells[1]
    assert cells[2] == f"{100 * best['val_acc']:.2f} %" and cells[3] == f"{100 * best['test_acc']:.2f} %"
    assert cells[4] == f"{100 * (best['val_acc'] - base['val_acc']):+.2f} pp"
    assert cells[6] == f"{100 * best['flops_ratio']:.1f} %"  # FLOPs
    assert "knee" in next(m for m in members if m.startswith(f"| {knee['trial']} |"))
    # the per-layer view: one row per decomposable conv, "g×r" or "kept" for each member
    layer_lines = md.split("## Where the network was compressed", 1)[1].split("\n\n", 2)[1].splitlines()
    assert [ln.split("|")[1].strip() for ln in layer_lines[2:]] == [
        "features.0",
        "features.3",
        "features.6",
        "features.10",
        "features.13",
    ]
    plan = json.loads(best["plan"])
    column = [ln.split("|")[1:-1] for ln in layer_lines[2:]]
    header = [h.strip() for h in layer_lines[0].split("|")[1:-1]]
    j = header.index(f"#{best['trial']} best" + (", knee" if best["is_knee"] else ""))
    for cells in column:
        choice = plan.get(cells[0].strip(), "keep")
        assert cells[j].strip() == ("kept" if choice == "keep" else f"{choice[0]}×{choice[1]}")


def test_report_of_a_run_with_failed_and_infeasible_trials(synthetic: Path) -> None:
    html_path, md_path = write_report(str(synthetic))
    md = Path(md_path).read_text()
    assert "| trials | 5 finished of 6 asked: 3 trained, 1 infeasible, 1 failed, 1 running |" in md
    assert "| wall time | 45.0 s |" in md and "| device time | 8.0 s" in md
    # no pareto.parquet: the front comes from trials.parquet, as the search computes it
    members = md.split("## Front members", 1)[1].split("\n\n", 2)[1].splitlines()[2:]
    assert [m.split("|")[1].strip() for m in members] == ["0", "2", "1"]  # by FLOPs
    assert "best" in members[2] and "| 98.00 % | — |" in members[2]  # no test accuracy measured yet
    assert "latency" not in md  # not measured in this run
    html = Path(html_path).read_text()
    assert html.count("<tr>") > 10 and 'id="plot-pareto-flops"' in html


def test_report_shows_latency_when_measured(synthetic: Path) -> None:
    table = pq.read_table(synthetic / "trials.parquet").to_pylist()
    for row in table:
        if row["status"] == "ok":
            row["latency_ms"] = 0.5 * row["flops_ratio"] + 0.1
            row["latency_ratio"] = row["latency_ms"] / 0.6
    from fga_search.runs._records import rows_to_table, write_parquet

    write_parquet(rows_to_table(table), str(synthetic / "trials.parquet"))
    _, md_path = write_report(str(synthetic))
    md = Path(md_path).read_text()
    header = md.split("## Front members", 1)[1].split("\n\n", 2)[1].splitlines()[0]
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[cols.index("FLOPs") + 2] == "latency"  # FLOPs, MACs, then latency beside them
    assert "(report_files/pareto-latency.png)" in md
    row1 = next(r for r in table if r["trial"] == 1)
    assert f"{row1['latency_ms']:.3g} ms" in md


def _timed_on_this_cpu(run: Path, ratios: dict[int, float], *, knee: int | None = None) -> None:
    """Give a run folder the front the search writes without a --target: each member timed side by
    side with the original (1 ms) on this CPU, at the given latency ratios (pareto.parquet,
    front_latency.json); ``knee`` moves the knee mark to that trial."""
    from fga_search.runs._pareto import mark_front
    from fga_search.runs._records import FrontRecord, rows_to_table, write_parquet

    front = [
        {**r.to_row(), "cpu_latency_ms": ratios[r.trial], "cpu_latency_ratio": ratios[r.trial]}
        for r in mark_front(rows(run / "trials.parquet"), costs=["flops_ratio"])
    ]
    if knee is not None:
        front = [{**r, "is_knee": r["trial"] == knee} for r in front]
    assert sorted(ratios) == sorted(r["trial"] for r in front)
    timing = {"device": "Test CPU (2 threads)", "batch": 1, "runs": 30, "original_ms": 1.0}
    (run / "front_latency.json").write_text(
        json.dumps({**timing, "trials": {str(t): ratios[t] for t in ratios}})
    )
    write_parquet(rows_to_table(front, FrontRecord), str(run / "pareto.parquet"))


def test_report_says_first_when_the_best_is_slower_than_the_original(synthetic: Path) -> None:
    """Without a --target the search ranks FLOPs; when its best runs slower than the original on
    this CPU, the report says so in its first lines and on the pick's card. In this front trial 1 is
    the best, trial 2 the knee."""
    _timed_on_this_cpu(synthetic, {0: 0.6, 1: 1.25, 2: 0.9})
    html_path, md_path = write_report(str(synthetic))
    md = Path(md_path).read_text()
    lines = md.splitlines()
    assert lines[4:6] == ["## The run", ""]
    assert lines[6] == (
        "**The best model is slower than the original on this CPU**: 1.25x the original's latency "
        "(batch 1, Test CPU (2 threads)), at 19.7 % of the FLOPs. Fewer FLOPs are not faster here. To "
        "search for speed, use `--budget-metric latency --target cpu`."
    )
    assert lines[8] == "|  | value |" and lines[10].startswith("| command |")  # the run's table, as before
    cards = md.split("## Which model to ship", 1)[1].split("## Pareto front", 1)[0]
    best_card, knee_card = cards.split("**Knee of the front**")
    assert "* trial: 1" in best_card and "* CPU latency: 1.25 ms (125.0 %)" in best_card
    assert "* speed: **slower than the original on this CPU** (1.25x its latency)" in best_card
    assert "* trial: 2" in knee_card and "speed" not in knee_card  # 0.9x: faster
    html = Path(html_path).read_text()
    heading, table = html.index('<h2 id="run">'), html.index('<table class="dataframe kv" id="run">')
    assert (
        heading
        < html.index("<p><strong>The best model is slower than the original on this CPU</strong>")
        < table
    )
    assert (
        "<dt>speed</dt><dd><strong>slower than the original on this CPU</strong> (1.25x its latency)</dd>"
        in html
    )

    # the knee slower, the best not
    _timed_on_this_cpu(synthetic, {0: 0.6, 1: 0.95, 2: 1.1})
    _, md_path = write_report(str(synthetic))
    lines = Path(md_path).read_text().splitlines()
    assert lines[6].startswith(
        "**The knee is slower than the original on this CPU**: 1.10x the original's latency (batch 1, "
        "Test CPU (2 threads)), at 18.6 % of the FLOPs; the best model is not. "
    )

    # both slower: one sentence names both
    _timed_on_this_cpu(synthetic, {0: 0.6, 1: 1.25, 2: 1.1})
    _, md_path = write_report(str(synthetic))
    lines = Path(md_path).read_text().splitlines()
    assert (
        "on this CPU**: 1.25x the original's latency (batch 1, Test CPU (2 threads)), at 19.7 % of the FLOPs; "
        "so is the knee: 1.10x the original's latency, at 18.6 % of the FLOPs. " in lines[6]
    )
    assert Path(md_path).read_text().count("* speed: **slower than the original on this CPU**") == 2

    # the best is the knee: said once
    _timed_on_this_cpu(synthetic, {0: 0.6, 1: 1.25, 2: 0.9}, knee=1)
    _, md_path = write_report(str(synthetic))
    lines = Path(md_path).read_text().splitlines()
    assert lines[6].startswith(
        "**The best model (also the knee) is slower than the original on this CPU**: 1.25x the original's "
        "latency (batch 1, Test CPU (2 threads)), at 19.7 % of the FLOPs. Fewer FLOPs"
    )


def test_report_of_a_faster_best_says_nothing_of_slowness(synthetic: Path) -> None:
    _timed_on_this_cpu(synthetic, {0: 0.6, 1: 0.8, 2: 0.7})
    html_path, md_path = write_report(str(synthetic))
    md, html = Path(md_path).read_text(), Path(html_path).read_text()
    assert "* CPU latency: 0.8 ms (80.0 %)" in md  # timed, and faster
    lines = md.splitlines()
    assert lines[4:7] == ["## The run", "", "|  | value |"]  # the run's table first, as before
    assert "slower" not in md and "slower" not in html
    assert "* speed:" not in md and "<dt>speed</dt>" not in html


def test_markdown_table_escapes_pipes() -> None:
    import pandas as pd

    text = markdown_table(pd.DataFrame({"a": ["x|y", None], "b": [1, 2]}))
    assert text.splitlines() == ["| a | b |", "|---|---|", "| x\\|y | 1 |", "| — | 2 |"]


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def test_report_bad_input(tmp_path: Path, synthetic: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = fake_run(tmp_path / "empty", [digits_trial(0, PLANS[0], state="RUNNING", status="running")])
    (tmp_path / "plain").mkdir()
    (tmp_path / "file.txt").write_text("x")
    cases = [
        ([str(empty)], f"run folder {empty} has no finished trials yet"),
        ([str(tmp_path / "plain")], f"{tmp_path / 'plain'} is not an fga-search run folder (no run.json)"),
        ([str(tmp_path / "missing")], f"run folder {tmp_path / 'missing'} does not exist"),
        ([str(synthetic), "--out", str(tmp_path / "file.txt" / "r")], "is not a folder"),
    ]
    for args, message in cases:
        code, err = _cli(["report", *args], capsys)
        assert code == 2, err
        assert err.startswith("fga-search: error: ") and err.count("\n") == 1 and message in err, err
    assert not (empty / "report.html").exists() and not (empty / "report_files").exists()
    assert sorted(os.listdir(tmp_path / "plain")) == []


def test_report_cli_writes_both_files(synthetic: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["report", str(synthetic)])
    out = capsys.readouterr().out
    assert code == 0
    assert f"report: {synthetic / 'report.html'}" in out and str(synthetic / "report.md") in out
    assert (synthetic / "report.html").stat().st_size > 50_000  # three inline PNGs


def test_report_rebuilds_every_view_from_the_study_alone(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The study is the one source of truth: with trials.parquet, pareto.parquet, the report and
    the post-search measurements' JSON copies deleted, 'fga-search report' writes them again from
    study.db, as the search wrote them."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    views = ("trials.parquet", "pareto.parquet", "test_acc.json", "front_latency.json")
    before = {name: rows(copy / name) for name in views[:2]}
    assert before["trials.parquet"] and any(r["test_acc"] is not None for r in before["pareto.parquet"])
    assert any(r["cpu_latency_ms"] is not None for r in before["pareto.parquet"])
    for name in (*views, "report.html", "report.md"):
        (copy / name).unlink()
    assert main(["report", str(copy)]) == 0
    assert "(from the study)" in capsys.readouterr().out
    assert {name: rows(copy / name) for name in views[:2]} == before
    assert (copy / "report.html").is_file() and (copy / "report.md").is_file()
