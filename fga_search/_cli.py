"""The ``fga-search`` command line: search (the default), ``report`` and ``export``."""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit code 2
        self.exit(2, f"fga-search: error: {message}\n")


def _add_search_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to compress")
    g.add_argument(
        "--model",
        help="zoo name (resnet56, vgg16_cifar, ...), torchvision name, or pkg.module:factory; default: the quickstart's digits CNN",
    )
    g.add_argument("--weights", help="the trained model's state_dict (loaded with weights_only=True)")
    g.add_argument("--dataset", default="digits", help="digits (default), cifar10, cifar100 or imagefolder")
    g.add_argument(
        "--data-dir",
        help="dataset folder (torchvision's CIFAR format, or an ImageFolder tree with train/ and val/ or test/)",
    )
    g.add_argument("--download", action="store_true", help="download CIFAR into --data-dir if missing")
    g.add_argument("--image-size", type=int, help="resize ImageFolder images to this size (pixels)")
    g = p.add_argument_group("the search")
    g.add_argument(
        "--budget",
        type=float,
        default=0.2,
        help="max cost as a fraction of the original's, in (0, 1] (default 0.2)",
    )
    g.add_argument(
        "--budget-metric",
        default="flops",
        choices=["flops", "params"],
        help="what --budget limits (default flops)",
    )
    g.add_argument(
        "--trials", type=int, help="trials to finish, resumed runs included (default 40; quickstart 50)"
    )
    g.add_argument(
        "--epochs",
        type=float,
        help="fine-tuning epochs per trial, fractions allowed; 0 = no fine-tuning (default 1; quickstart 3)",
    )
    g.add_argument(
        "--sampler",
        default="nsga2",
        choices=["nsga2", "tpe", "random"],
        help="Optuna sampler (default nsga2)",
    )
    g.add_argument("--population", type=int, help="NSGA-II population size (default: trials/4, 4..50)")
    g.add_argument(
        "--space",
        help="search space: a shipped name (default, resnet_cifar, vgg_cifar, torchvision_resnet) or a YAML path",
    )
    g.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the validation split, the sampler and the trials (default 0)",
    )
    g = p.add_argument_group("each trial")
    g.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    g.add_argument("--batch-size", type=int, default=128, help="fine-tuning batch size (default 128)")
    g.add_argument("--lr", type=float, default=0.02, help="peak fine-tuning learning rate (default 0.02)")
    g.add_argument(
        "--workers",
        type=int,
        default=0,
        help="data-loading worker processes for datasets streamed from disk (default 0)",
    )
    g.add_argument(
        "--calibration", type=int, default=256, help="images for data-driven refinement (default 256)"
    )
    g.add_argument(
        "--recalibration", type=int, default=1024, help="images for BN recalibration (default 1024)"
    )
    g.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="validation split held out of the training data (default 0.1)",
    )
    g.add_argument("--train-limit", type=int, help="use a stratified subset of this many training images")
    g.add_argument("--val-limit", type=int, help="use a stratified subset of this many validation images")
    g.add_argument("--test-limit", type=int, help="use a stratified subset of this many test images")
    g = p.add_argument_group("storage")
    g.add_argument(
        "--out", help="run folder (default runs/MODEL-DATASET-bBUDGET); an existing one is resumed"
    )
    g.add_argument("--storage", help="Optuna RDB URL for the study (default: sqlite in the run folder)")
    g.add_argument("--study-name", help="study name in --storage (default: derived from the run folder)")
    g.add_argument("--quiet", action="store_true", help="print only the final summary")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fga-search",
        description="Compress a trained CNN by filter group approximation: a multi-objective search "
        "(validation accuracy vs FLOPs) over per-layer group counts and ranks, within a budget.",
    )
    _add_search_options(parser)
    return parser


def _search(args: argparse.Namespace) -> int:
    from ._config import RunConfig
    from ._search import run_search

    model_name = args.model or "digits_cnn"
    out = args.out or os.path.join(
        "runs", f"{model_name.replace(':', '_').replace('.', '_')}-{args.dataset}-b{args.budget:g}"
    )
    quickstart = args.model is None
    if args.trials is None:
        args.trials = 50 if quickstart else 40
    if args.epochs is None:
        args.epochs = 3.0 if quickstart else 1.0
    options = {k: v for k, v in vars(args).items() if k in RunConfig.field_names()}
    options["out"] = out
    config = RunConfig(**options)
    result = run_search(config)
    base = result.baseline
    print(f"run folder: {result.run_dir}")
    print(
        f"trials: {result.finished} finished ({result.trials} recorded) in {os.path.join(result.run_dir, 'trials.parquet')}"
    )
    print(f"Pareto front: {len(result.front)} models in {os.path.join(result.run_dir, 'pareto.parquet')}")
    if base:
        print(
            f"original: val accuracy {base['val_acc']:.4f}, test {base['test_acc']:.4f}, {base['macs'] / 1e6:.2f} M MACs"
        )
    for row in result.front:
        mark = " <- best within budget" if row.get("is_best") else (" <- knee" if row.get("is_knee") else "")
        test = f", test {row['test_acc']:.4f}" if row.get("test_acc") is not None else ""
        print(
            f"  trial {row['trial']:>4}: val {row['val_acc']:.4f}{test}, FLOPs {row['flops_ratio']:.3f}, "
            f"params {row['params_ratio']:.3f}{mark}"
        )
    if result.best is not None:
        ckpt = os.path.join(result.run_dir, "models", f"trial_{result.best['trial']:05d}.pt")
        print(f"best model: trial {result.best['trial']}, weights {ckpt}")
    else:
        print("no finished trial within the budget yet")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _search(args)
    except KeyboardInterrupt:
        print("fga-search: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"fga-search: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
