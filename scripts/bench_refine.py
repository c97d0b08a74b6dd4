"""Proxy accuracy by calibration-image count, with the held-out ridge choice of refinement on and off.

The refinement refits each FGA layer's 1x1 conv by ridge least squares on sampled positions of
the calibration images. Where a layer has fewer than 10 positions per fitted weight, the ridge
strength is chosen on held-out positions (``fga_search/core/_refine.py``); "off" fits every layer with
the weakest ridge, as if it were well determined (the behaviour before that choice). For uniform
plans (g = 1, 4, 8) of the shared ResNet-56 and VGG-16, each row is a trial without fine-tuning:
SVD + refinement on the first N of 128 calibration images + BN recalibration (512 images),
scored on 2,000 validation images. The two settings run side by side on the same plan and
images; the seconds are each trial's wall time (SVD, refinement, BN recalibration, evaluation).

    python scripts/bench_refine.py [--calibration 2,4,8,128] [--cases resnet56:0.35,vgg16_cifar:0.2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

import fga_search.core._refine as refine_module
from _bench_common import WEIGHTS, checkpoint, cifar_dir
from fga_search.engine._config import RunConfig
from fga_search.engine._setup import make_runner, prepare
from fga_search.engine._strategies import uniform_plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cases", default="resnet56:0.35,vgg16_cifar:0.2", help="model:budget, comma-separated"
    )
    parser.add_argument("--calibration", default="2,4,8,128", help="calibration image counts (at most 128)")
    parser.add_argument("--groups", default="1,4,8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    counts = [int(n) for n in args.calibration.split(",")]
    if not all(1 <= n <= 128 for n in counts):
        raise SystemExit(f"--calibration counts must be in 1..128, got {args.calibration}")
    well_determined = refine_module._WELL_DETERMINED
    print(
        "| model | budget | plan | calibration images | proxy acc, held-out ridge | off | seconds on / off |"
    )
    print("|---|---|---|---|---|---|---|")
    for case in args.cases.split(","):
        model, budget = case.split(":")
        with tempfile.TemporaryDirectory() as out:
            config = RunConfig(
                out=os.path.join(out, "run"),
                model=model,
                weights=checkpoint(WEIGHTS[model]),
                dataset="imagefolder",
                data_dir=args.data_dir or cifar_dir(),
                budget=float(budget),
                trials=1,
                epochs=0.0,
                strategy="uniform",
                device="cpu",
                calibration=128,
                recalibration=512,
                train_limit=10_000,
                val_limit=2000,
                test_limit=2000,
                quiet=True,
            )
            setup = prepare(config, log=False)
            runner = make_runner(setup)
        full = runner.calibration
        for g in (int(x) for x in args.groups.split(",")):
            plan = uniform_plan(setup.profile, budget=float(budget), groups=g)
            for n in counts:
                runner.calibration = full[:n]
                acc, sec = {}, {}
                for name, value in (("on", well_determined), ("off", 0)):
                    refine_module._WELL_DETERMINED = value
                    start = time.perf_counter()
                    acc[name] = runner.run(plan, seed=0).proxy_acc
                    sec[name] = time.perf_counter() - start
                refine_module._WELL_DETERMINED = well_determined
                print(
                    f"| {model} | {budget} | uniform g = {g} | {n} | {acc['on']:.2%} | {acc['off']:.2%} "
                    f"| {sec['on']:.1f} / {sec['off']:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
