"""``bench_speed.py ranks``: does ``rank_multiple`` make whole models faster where they ship?

Per model, the error-allocation plan at each FLOPs budget is built three ways: with its exact
ranks, and as the search treats that proposal when its space sets ``rank_multiple`` 8 or 16:
every rank rounded to the nearest multiple (``round_plan``), then repaired into the budget, which
steps ranks down by the multiple. So all three fit the same FLOPs budget. On the CIFAR models,
each plan's accuracy before fine-tuning is given too (``fga_search.compress``: SVD, refinement on
128 training images, batch norms re-estimated on 512; scored on 2,000 test images), since
rounding moves rank between layers. Each plan is timed as the
export ships it (batch norms folded, each grouped conv the faster way) against the original, side
by side in one process, in ONNX Runtime on the CPU target (2 threads, batch 1, float32), in
``--repeats`` repetitions: medians and their spread. Random weights serve where latency is all
that is measured (ResNet-50 at 224 px); the CIFAR models use the shared checkpoints."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics

import torch

from _bench_common import checkpoint, cifar_dir
from fga_search import ModelProfile, build_model, compress, load_dataset
from fga_search.core._spectra import SpectralTable
from fga_search.core._surgery import apply_plan_structure
from fga_search.engine._cost import CostModel
from fga_search.engine._repair import repair
from fga_search.engine._space import load_space
from fga_search.engine._strategies import error_alloc_plan
from fga_search.latency import Target, measure_side_by_side_as_exported
from fga_search.models._loader import DeviceSplit
from fga_search.models._zoo import CIFAR10
from fga_search.train._evaluate import evaluate

CASES = {  # name: (model, classes, weights, space, input shape)
    "vgg16": ("vgg16_cifar", 10, "vgg16_cifar10.pt", "vgg_cifar", (3, 32, 32)),
    "resnet56": ("resnet56", 10, "resnet56_cifar10.pt", "resnet_cifar", (3, 32, 32)),
    "resnet50": ("resnet50", 1000, None, "torchvision_resnet", (3, 224, 224)),
}
MULTIPLES = (1, 8, 16)


def run_case(case: str, *, budgets: list[float], repeats: int, runs: int, target: Target) -> None:
    name, classes, weights, space_name, shape = CASES[case]
    model = build_model(name, num_classes=classes, weights=checkpoint(weights) if weights else None).eval()
    profile = ModelProfile(model, input_shape=shape)
    space = dataclasses.replace(
        load_space(space_name), rank_multiple=1
    )  # exact ranks, whatever the file sets
    resolved = space.resolve(profile.layers, strict=False)
    cost, spectra = CostModel(profile, "flops"), SpectralTable(model)
    data = None if weights is None else load_dataset("imagefolder", data_dir=cifar_dir(), train_limit=10_000,
                                                     test_limit=2000)  # fmt: skip
    test = None if data is None else DeviceSplit(data.test, device="cpu", normalization=CIFAR10)
    for budget in budgets:
        plan = error_alloc_plan(resolved, cost, spectra, budget=budget)
        if plan is None:
            print(f"{case} @ {budget}: no error allocation fits")
            continue
        models, flops, acc = {"original": model}, {}, {}
        for m in MULTIPLES:
            p = plan
            if m > 1:  # as the search treats a proposal: rounded, then repaired into the budget
                rounded = dataclasses.replace(space, rank_multiple=m).resolve(profile.layers, strict=False)
                p = repair(rounded.round_plan(plan), cost=cost, spectra=spectra, space=rounded, budget=budget)
            models[f"x{m}"] = apply_plan_structure(copy.deepcopy(model), p).eval()
            flops[f"x{m}"] = profile.ratio(p)
            if data is not None and test is not None:
                student = compress(model, p, data, normalization=CIFAR10, calibration=128, recalibration=512)
                acc[f"x{m}"] = evaluate(student, test)
        ratios: dict[str, list[float]] = {k: [] for k in flops}
        for _ in range(repeats):
            ms = measure_side_by_side_as_exported(
                models, input_shape=shape, target=target, rounds=max(1, runs // 10)
            )
            for k in ratios:
                ratios[k].append(ms[k] / ms["original"])
        cells = "; ".join(
            f"ranks x{k[1:]}: FLOPs {flops[k]:.3f}, latency {statistics.median(v):.3f} "
            f"({min(v):.3f}-{max(v):.3f})" + (f", accuracy {100 * acc[k]:.1f} %" if k in acc else "")
            for k, v in ratios.items()
        )
        print(f"{case} @ FLOPs {budget}, error allocation, {target.runtime}: {cells}", flush=True)


def ranks(args: argparse.Namespace) -> None:
    torch.set_num_threads(2)
    target = Target.parse("cpu:2")  # ONNX Runtime: the CPU default
    print(f"target {target.key()}; {args.repeats} repetitions of {args.runs} runs, ratio to the original")
    for case in args.cases:
        run_case(case, budgets=args.rank_budgets, repeats=args.repeats, runs=args.runs, target=target)
