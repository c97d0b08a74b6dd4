"""Import time of ``fga_search``: ``import fga_search`` (lazy: no private module, no torch, optuna,
pandas, pyarrow or ray) and the first use of a public name, which imports that name's module.

Each figure is the median of --runs fresh interpreters (each timed from inside, around the import
alone, so the interpreter's own start-up is not counted), with the lowest and highest run.

    python scripts/bench_import.py [--runs 10] [--attrs Normalization,search,write_report]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "optuna", "pandas", "pyarrow", "ray")

_PROBE = """
import json, sys, time
t0 = time.perf_counter()
import fga_search
t1 = time.perf_counter()
attr = sys.argv[1]
if attr:
    getattr(fga_search, attr)
t2 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "attr": t2 - t1, "file": fga_search.__file__,
                  "heavy": [m for m in sys.argv[2].split(",") if m in sys.modules]}))
"""


def _once(attr: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, attr, ",".join(HEAVY)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"the probe failed: {proc.stderr.strip().splitlines()[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _line(label: str, seconds: list[float], heavy: list[str]) -> str:
    ms = [s * 1000 for s in seconds]
    loaded = ", ".join(heavy) if heavy else "none"
    return (
        f"{label:<34} median {statistics.median(ms):8.1f} ms  "
        f"(min {min(ms):7.1f}, max {max(ms):7.1f}; n={len(ms)})  heavy modules: {loaded}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="fresh interpreters per figure (default 10)")
    parser.add_argument(
        "--attrs",
        default="Normalization,search,write_report",
        help="public names whose first use is timed, comma-separated (default %(default)s)",
    )
    args = parser.parse_args()
    if args.runs < 1:
        parser.error(f"--runs must be >= 1, got {args.runs}")
    attrs = [a for a in args.attrs.split(",") if a]
    first = _once("")
    print(f"python {sys.version.split()[0]}, fga_search from {first['file']}")
    plain = [_once("") for _ in range(args.runs)]
    print(_line("import fga_search", [r["import"] for r in plain], plain[-1]["heavy"]))
    for attr in attrs:
        runs = [_once(attr) for _ in range(args.runs)]
        print(_line(f"first fga_search.{attr}", [r["attr"] for r in runs], runs[-1]["heavy"]))


if __name__ == "__main__":
    main()
