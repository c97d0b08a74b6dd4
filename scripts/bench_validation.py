"""What validating on training images costs (issue 28, item 2).

Our checkpoints, like most users', were trained on the whole training split: a trial scored on a
held-out part of it (the default when the data has no validation split of its own) is scored on
images the model learned by heart. This benchmark measures what that does to the search's choice.

The test split is cut into two disjoint stratified halves (``--split-seed``): **clean** images,
which no run sees, and **test** images, which the run uses as its test split. Each case runs a
search with the default validation (stratified 10 % of the training split, ``--val-limit``
images), then re-runs every finished trial from its plan and seed (the same model: the
re-run's validation accuracy is checked against the recorded one) and scores it on the clean
and the test images. Per run:

* Kendall's tau-b between the trials' training-image validation scores and their clean scores;
* the regret: test accuracy of the best-by-clean-validation plan within the budget minus that of
  the best-by-training-validation plan (points lost by ranking on training images);
* for reference, each one's test accuracy, and the best test accuracy of any trial (oracle).

Cases: the shared ResNet-56 and VGG-16 at budget 0.2, in proxy mode (``--epochs 0``: no
fine-tuning) and with 0.1-epoch trials, on 10,000 training images (CPU sizes of bench_quality).

    python scripts/bench_validation.py [--trials 16] [--seeds 0] [--cases resnet56,vgg16] [--epochs 0,0.1]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import time

from scipy.stats import kendalltau  # scipy comes with scikit-learn, a dependency

from _bench_common import checkpoint, cifar_dir
from fga_search import load_plan
from fga_search.data._imagefolder import _load_folder
from fga_search.engine._config import RunConfig
from fga_search.engine._search import run_search
from fga_search.engine._setup import make_runner, prepare
from fga_search.models._loader import DeviceSplit
from fga_search.runs._records import read_table
from fga_search.train._evaluate import evaluate

CASES = {"resnet56": ("resnet56", "resnet56_cifar10.pt"), "vgg16": ("vgg16_cifar", "vgg16_cifar10.pt")}


def split_test(cifar: str, out: str, *, seed: int, per_class: int | None) -> tuple[str, str]:
    """``out/data`` (train/ = the CIFAR training split, test/ = one half of its test split) and
    ``out/clean`` (the other half), as folders of symlinks; stratified by class, drawn with ``seed``."""
    data, clean = os.path.join(out, "data"), os.path.join(out, "clean")
    for folder in (data, clean):
        shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(data)
    os.symlink(os.path.join(cifar, "train"), os.path.join(data, "train"))
    rng = random.Random(seed)
    for cls in sorted(os.listdir(os.path.join(cifar, "test"))):
        files = sorted(os.listdir(os.path.join(cifar, "test", cls)))
        rng.shuffle(files)
        half = len(files) // 2
        n = min(half, per_class) if per_class else half
        for folder, part in ((clean, files[:n]), (os.path.join(data, "test"), files[half : half + n])):
            os.makedirs(os.path.join(folder, cls))
            for f in part:
                os.symlink(os.path.join(cifar, "test", cls, f), os.path.join(folder, cls, f))
    return data, clean


def run_case(args: argparse.Namespace, case: str, epochs: float, seed: int, data: str, clean: str) -> dict:
    model, weights = CASES[case]
    out = os.path.join(args.out, f"{case}-e{epochs:g}-s{seed}")
    shutil.rmtree(out, ignore_errors=True)
    config = RunConfig(out=out, model=model, weights=checkpoint(weights), dataset="imagefolder", data_dir=data,
                       budget=0.2, trials=args.trials, epochs=epochs, strategy="search", seed=seed, device="cpu",
                       batch_size=128, lr=0.02, calibration=128, recalibration=512, train_limit=10_000,
                       val_limit=args.val_limit, front_latency_runs=0, quiet=True)  # fmt: skip
    start = time.perf_counter()
    run_search(config)
    search_s = time.perf_counter() - start
    setup = prepare(config, log=False, latency_floor_check=False, time_latency=False)
    runner = make_runner(setup)
    _, clean_split = _load_folder(clean, None, 2**33, 0)
    clean_data = DeviceSplit(clean_split, device=runner.device, normalization=setup.normalization)
    rows = [r for r in read_table(os.path.join(out, "trials.parquet")).to_pylist() if r["status"] == "ok"]
    scored, drift = [], 0.0
    for row in rows:
        outcome = runner.run(load_plan(row["plan"]), seed=int(row["seed"]))
        drift = max(drift, abs(outcome.val_acc - row["val_acc"]))
        scored.append(
            dict(
                trial=row["trial"],
                val=row["val_acc"],
                within=bool(row["within_budget"]),
                clean=evaluate(outcome.model, clean_data, batch_size=setup.settings.eval_batch),
                test=runner.evaluate(outcome.model, split="test"),
            )
        )
    within = [s for s in scored if s["within"]]
    by_val = max(within, key=lambda s: (s["val"], -s["trial"]))
    by_clean = max(within, key=lambda s: (s["clean"], -s["trial"]))
    result = dict(
        case=case, epochs=epochs, seed=seed, trials=len(scored),
        tau=float(kendalltau([s["val"] for s in scored], [s["clean"] for s in scored]).statistic),  # tau-b
        regret=by_clean["test"] - by_val["test"], by_val=by_val, by_clean=by_clean,
        oracle=max(s["test"] for s in within), val_mean=statistics.mean(s["val"] for s in scored),
        clean_mean=statistics.mean(s["clean"] for s in scored), drift=drift, search_s=search_s,
        total_s=time.perf_counter() - start, clean_n=len(clean_split), test_n=len(runner.test.labels),
    )  # fmt: skip
    print(
        f"{case} epochs {epochs:g} seed {seed}: {len(scored)} trials; tau(train-val, clean) {result['tau']:.3f}; "
        f"best by train-val #{by_val['trial']} (val {by_val['val']:.4f}, clean {by_val['clean']:.4f}, test "
        f"{by_val['test']:.4f}); best by clean #{by_clean['trial']} (val {by_clean['val']:.4f}, clean "
        f"{by_clean['clean']:.4f}, test {by_clean['test']:.4f}); regret {100 * result['regret']:+.2f} points; "
        f"oracle test {result['oracle']:.4f}; mean val {result['val_mean']:.4f} vs clean {result['clean_mean']:.4f}; "
        f"re-run val drift {drift:.2e}; {result['search_s']:.0f} s search, {result['total_s']:.0f} s in all",
        flush=True,
    )  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=lambda t: t.split(","), default=list(CASES))
    parser.add_argument("--epochs", type=lambda t: [float(e) for e in t.split(",")], default=[0.0, 0.1])
    parser.add_argument("--seeds", type=lambda t: [int(s) for s in t.split(",")], default=[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--val-limit", type=int, default=2000, help="training-split validation images")
    parser.add_argument("--per-class", type=int, default=200, help="clean and test images per class")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench-validation")
    args = parser.parse_args()
    if set(args.cases) - set(CASES):
        parser.error(f"--cases takes {', '.join(CASES)}, got {','.join(args.cases)}")
    data, clean = split_test(cifar_dir(), args.out, seed=args.split_seed, per_class=args.per_class)
    results = [
        run_case(args, case, epochs, seed, data, clean)
        for case in args.cases
        for epochs in args.epochs
        for seed in args.seeds
    ]
    print(
        "\n| model | trials | tau (train-val vs clean) | regret (test points) | test: best by train-val / by clean / oracle | mean val: train / clean | wall |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        mode = "proxy" if r["epochs"] == 0 else f"{r['epochs']:g}-epoch"
        print(
            f"| {r['case']} @ 0.2, {mode} trials, seed {r['seed']} "
            f"| {r['trials']} | {r['tau']:.3f} | {100 * r['regret']:+.2f} | {100 * r['by_val']['test']:.2f} / "
            f"{100 * r['by_clean']['test']:.2f} / {100 * r['oracle']:.2f} % | {100 * r['val_mean']:.1f} / "
            f"{100 * r['clean_mean']:.1f} % | {r['total_s']:.0f} s |"
        )  # fmt: skip


if __name__ == "__main__":
    main()
