"""Per-trial overhead of the Optuna and Ray backends on 30 tiny trials, measured side by side.

Each backend runs the quickstart's digits search with ``--epochs 0`` (a trial is decomposition,
refinement, BN recalibration and evaluation: well under a second). A trial's overhead is the
time from its start to the next trial's start, minus the trial's own work (``seconds_total``);
trials run one at a time (``--max-concurrent 1`` for Ray). Prints medians and the ratio.

    python scripts/bench_ray_overhead.py [--trials 30]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import sys
import tempfile
import time

import pyarrow.parquet as pq


def overheads(run: str) -> tuple[list[float], list[float]]:
    rows = sorted(
        pq.read_table(os.path.join(run, "trials.parquet")).to_pylist(), key=lambda r: r["datetime_start"]
    )
    rows = [r for r in rows if r["state"] == "COMPLETE" and r["seconds_total"] is not None]
    starts = [dt.datetime.fromisoformat(r["datetime_start"]).timestamp() for r in rows]
    own = [r["seconds_total"] for r in rows]
    return [b - a - w for a, b, w in zip(starts, starts[1:], own)], own


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    args = parser.parse_args()
    base = [
        "--trials",
        str(args.trials),
        "--epochs",
        "0",
        "--quiet",
        "--sampler",
        "random",
        "--device",
        "cpu",
    ]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        # train and cache the quickstart model first, outside the measurement
        subprocess.run(
            [
                sys.executable,
                "-m",
                "fga_search._cli",
                "--trials",
                "1",
                "--epochs",
                "0",
                "--quiet",
                "--out",
                f"{tmp}/warm",
            ],
            env=env,
            check=True,
            capture_output=True,
        )
        for name, extra in (("optuna", []), ("ray", ["--backend", "ray", "--max-concurrent", "1"])):
            run = f"{tmp}/{name}"
            start = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "fga_search._cli", *base, *extra, "--out", run],
                env=env,
                check=True,
                capture_output=True,
            )
            wall = time.perf_counter() - start
            gaps, own = overheads(run)
            results[name] = (statistics.median(gaps), statistics.mean(gaps), statistics.median(own), wall)
    print(f"{args.trials} tiny trials per backend (digits, --epochs 0), one at a time, 2 CPU cores")
    print(
        f"{'backend':<8} {'overhead/trial median s':>24} {'mean s':>8} {'own work median s':>18} {'process wall s':>15}"
    )
    for name, (med, mean, own_med, wall) in results.items():
        print(f"{name:<8} {med:>24.3f} {mean:>8.3f} {own_med:>18.3f} {wall:>15.1f}")
    print(
        f"Ray / Optuna overhead ratio (medians): {results['ray'][0] / max(results['optuna'][0], 1e-9):.1f}x; target: Ray under 1.5 s per trial"
    )


if __name__ == "__main__":
    main()
