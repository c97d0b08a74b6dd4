"""``bench_speed.py deploy``: latency where the model ships (issue 27).

For each case, a latency search in ONNX Runtime (``--target cpu:2``, the CPU default runtime),
then the best model exported and timed against the original, both as ``model.onnx`` files in
ONNX Runtime, side by side (round by round), in ``--repeats`` repetitions: the median ratio and
its spread. ``resnet50``: torchvision ResNet-50 at 224 px, random weights (no trained weights
exist offline), a small synthetic 224-px ImageFolder, ``--epochs 0`` (latency only).
``vgg16``: the shared CIFAR VGG-16 checkpoint at ``--budget 0.40``, exported with
``--finetune-epochs`` (10 by the issue's recipe) and its test accuracy measured."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics

import numpy as np
import torch

from _bench_common import checkpoint, cifar_dir
from fga_search import build_model, export
from fga_search.deploy._runtime_latency import onnx_files_latency, write_onnx
from fga_search.engine._config import RunConfig
from fga_search.engine._search import run_search
from fga_search.latency import Target, as_deployed


def synthetic_imagefolder(root: str, *, size: int = 224, classes: int = 2, per_class: int = 6) -> str:
    """Random 224-px JPEGs in train/ and test/ ImageFolder trees (latency needs no real images)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(classes):
            folder = os.path.join(root, split, f"class{c}")
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"{i:03d}.jpg"))
    return root


def run_case(args: argparse.Namespace, case: str) -> None:
    out = os.path.join(args.out, f"deploy-{case}")
    shutil.rmtree(out, ignore_errors=True)
    target = Target.parse("cpu:2")  # ONNX Runtime: the CPU default
    common = dict(
        budget_metric="latency", target="cpu:2", device="cpu", trials=args.deploy_trials, quiet=True
    )
    if case == "resnet50":
        data = synthetic_imagefolder(os.path.join(args.out, "synthetic224"))
        budget, shape = args.deploy_budget or 0.5, (3, 224, 224)
        config = RunConfig(out=out, model="resnet50", dataset="imagefolder", data_dir=data, budget=budget,
                           epochs=0.0, front_latency_runs=0, **common)  # type: ignore[arg-type]  # fmt: skip
        original = build_model("resnet50", num_classes=2)
        finetune = 0.0
    else:
        budget, shape = args.deploy_budget or 0.40, (3, 32, 32)
        weights = checkpoint("vgg16_cifar10.pt")
        config = RunConfig(out=out, model="vgg16_cifar", weights=weights, dataset="imagefolder",
                           data_dir=args.data_dir or cifar_dir(), budget=budget, epochs=args.epochs,
                           front_latency_runs=0, **common)  # type: ignore[arg-type]  # fmt: skip
        original = build_model("vgg16_cifar", num_classes=10, weights=weights)
        finetune = args.finetune_epochs
    result = run_search(config)
    best = result.best
    print(f"{case}: search at latency budget {budget} in {target.runtime} on {target.hardware()}: "
          f"{result.finished} trials; best trial {best.trial if best else None}, searched latency ratio "
          f"{best.latency_ratio if best else None}")  # fmt: skip
    if best is None:
        return
    # (a long fine-tune shows its progress)
    exported = export(out, pick="best", out=os.path.join(out, "export"), formats=("onnx",),
                      finetune_epochs=finetune, finetune_lr=args.finetune_lr if finetune else None,
                      quiet=not finetune)  # fmt: skip
    original_onnx = os.path.join(out, "original.onnx")
    write_onnx(as_deployed(original.eval(), target), torch.zeros(1, *shape), original_onnx)
    paths = {"original": original_onnx, "fga": os.path.join(out, "export", "model.onnx")}
    ratios = []
    for _ in range(args.repeats):
        ms = onnx_files_latency(paths, input_shape=shape, target=target, runs=args.runs)
        ratios.append(ms["fga"] / ms["original"])
    acc = exported.test_acc  # on the test split, after the export's fine-tune (if any)
    print(f"{case}: exported best in ONNX Runtime vs the original's ONNX, side by side, {args.repeats} repetitions "
          f"of {args.runs} runs: median ratio {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max "
          f"{max(ratios):.3f}); FLOPs {best.flops_ratio:.3f}; test accuracy {acc}")  # fmt: skip


def deploy(args: argparse.Namespace) -> None:
    for case in args.cases:
        run_case(args, case)
