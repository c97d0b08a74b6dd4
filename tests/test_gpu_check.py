"""scripts/gpu_check.sh: the one prepared call of a GPU session must not fail on a code path.

Its ``--dry-run`` runs every step of ``--with-quality`` on the CPU at toy sizes (the figures
mean nothing; only that each part runs and prints what the GPU run's reader looks for)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from gpu_fit_trials import fit_trials  # noqa: E402

SPEED = """  FGA 0.2   plain loop on synthetic data    11820 img/s; fga-search loop on CIFAR-10    {rate} img/s = 0.85 of plain
  seconds per 1-epoch trial: median {trial} s (after a warm-up trial); target < 6 s on an H100
"""


@pytest.mark.parametrize(
    ("trial", "rate", "trials"),
    [
        ("2.00", 20000, 8),  # 500 - 300 (finals) - 60 (set-ups) = 140 s: 17 trials, at most 8
        ("5.00", 20000, 7),  # 140 / (4 x 5) = 7
        ("8.00", 20000, 4),  # 140 / (4 x 8) = 4.4
        ("2.50", 10000, 3),  # 500 - 600 - 60 < 0: at least 3
        ("16.24", 10594, 3),  # b37d748's figures: none fits, at least 3
    ],
)
def test_the_quality_trial_count_fits_the_speed_parts_figures(trial: str, rate: int, trials: int) -> None:
    n, why = fit_trials(SPEED.format(trial=trial, rate=rate), seconds=500)
    assert n == trials and why.startswith(f"{trials} trials per strategy: 500 s - final fine-tunes ~")


def test_the_quality_trial_count_without_the_speed_parts_figures_is_8() -> None:
    assert fit_trials("", seconds=350) == (8, "8 trials per strategy (the speed part's figures are missing)")
    assert fit_trials(SPEED.format(trial="5.00", rate=0), seconds=350)[0] == 8


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_part_on_the_cpu(shared: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "FGA_SHARED_DIR": str(shared), "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,  # two parts of at most 600 s each, and the set-up
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gpu_check done (bench_speed exit 0, bench_quality exit 0)" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "fidelity.txt", "gpu.txt", "quality.txt", "results.md", "speed.txt"
    ]  # fmt: skip
    fidelity = (out / "fidelity.txt").read_text()  # the multi-fidelity part's code path (--fidelity)
    assert re.search(r"^\| single \| 0 \| \d+\.\d+ % \|", fidelity, re.M), fidelity
    assert re.search(r"^\| rerun \| 0 \| \d+\.\d+ % \|", fidelity, re.M), fidelity
    assert "rerun vs single, best val within budget:" in fidelity
    gpu = (out / "gpu.txt").read_text()
    assert "dry run on the CPU" in gpu
    assert re.search(
        r"^quality part: [3-8] trials per strategy: \d+ s - final fine-tunes ~\d+ s", gpu, re.M
    ), gpu
    assert "quality part: dry run: 2 trials per strategy instead" in gpu, gpu

    speed = (out / "speed.txt").read_text()
    # 1. throughput of the original and of the FGA model, each against the plain loop
    ratios = re.findall(r"fga-search loop on CIFAR-10 +\d+ img/s = ([\d.]+) of plain", speed)
    assert len(ratios) == 2 and all(float(r) > 0 for r in ratios), speed
    # 2. four 1-epoch trials and their median after the warm-up
    assert len(re.findall(r"^  trial \d \(g=\d\): [\d.]+ s, val 0\.\d+", speed, flags=re.M)) == 4, speed
    assert re.search(r"seconds per 1-epoch trial: median [\d.]+ s", speed), speed
    # 3. the latency search (budget 1) ran its 2 trials and either found a model within it and
    # timed it beside the original (where every layer is kept dense, bf16 on these CPUs, that model
    # is the original: FLOPs 1) or measured both over it (a CPU whose FGA layers run faster in bf16
    # may measure both trials just over 1)
    found = re.search(
        r"2 trials in \d+ s; (\d+) of 54 layers kept dense .* best within latency budget 1\.0: "
        r"val [01]\.\d+, FLOPs ([\d.]+), latency ratio ([\d.]+) ",
        speed,
    )
    missed = re.search(
        r"no trial within the latency budget 1\.0 in 2 trials \(status and measured latency ratio of each: (.*)\)",
        speed,
    )
    assert bool(found) != bool(missed), speed
    if found:
        assert 0 < float(found.group(2)) <= 1 and float(found.group(3)) > 0, speed
        if found.group(1) == "54":
            assert found.group(2) == "1.000", speed
    else:
        assert missed is not None
        each = [item.split() for item in missed.group(1).split(", ")]
        assert len(each) == 2 and all(s == "infeasible" and float(r) > 1 for s, r in each), speed
    assert "4. torch.compile: skipped" in speed

    quality = (out / "quality.txt").read_text()
    runs = re.findall(
        r"^(resnet56|vgg16_cifar) +budget 0\.2 +(uniform|search) +seed 0 trials +2 ", quality, re.M
    )
    assert len(runs) == 4, quality
    finals = re.findall(
        r"^final fine-tune (resnet56|vgg16_cifar) \(\w+, 0\.1 epochs, batch 128, peak lr 0\.05\): test [\d.]+ %",
        quality,
        re.M,
    )
    assert finals == ["vgg16_cifar", "resnet56"], quality  # VGG-16 first (gpu_check.sh says why)
    table = (out / "results.md").read_text().splitlines()
    assert len(table) == 2 + 4 + 2 and table[-1].startswith("| resnet56, final fine-tune | 0.2 |")
