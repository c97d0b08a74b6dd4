"""The ``fga-search`` command line."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


class UsageError(Exception):
    """Bad input: printed as one line, exit code 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fga-search",
        description="Compress a trained CNN by filter group approximation within a FLOPs budget.",
    )
    parser.add_argument(
        "--budget", type=float, default=0.2, help="max FLOPs as a fraction of the original's, in (0, 1]"
    )
    return parser


def _demo(args: argparse.Namespace) -> int:
    import torch

    from ._data import load_dataset
    from ._evaluate import evaluate
    from ._flops import ModelProfile
    from ._loader import DeviceSplit
    from ._quickstart import QUICKSTART_MODEL, quickstart_weights
    from ._recalibrate import recalibrate_bn
    from ._strategies import uniform_plan
    from ._surgery import decompose
    from ._zoo import DIGITS, build_model

    if not 0.0 < args.budget <= 1.0:
        raise UsageError(f"--budget must be in (0, 1], got {args.budget}")
    torch.manual_seed(0)
    data = load_dataset("digits")
    model = build_model(QUICKSTART_MODEL, num_classes=data.num_classes, weights=quickstart_weights(data))
    train = DeviceSplit(data.train, device="cpu", normalization=DIGITS)
    val = DeviceSplit(data.val, device="cpu", normalization=DIGITS)
    profile = ModelProfile(model, input_shape=data.input_shape)
    base = evaluate(model, val)
    print(f"original: {profile.base_macs / 1e6:.2f} M MACs, val accuracy {base:.3f}")
    calib = next(train.batches(256, shuffle=True)).x
    for groups in (1, 2, 4):
        plan = uniform_plan(profile, budget=args.budget, groups=groups, skip={"features.0"})
        new = decompose(model, plan, calib)
        recalibrate_bn(new, train, images=512)
        acc = evaluate(new, val)
        print(
            f"uniform g={groups}: FLOPs ratio {profile.ratio(plan):.3f}, val accuracy {acc:.3f} (no fine-tuning)"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _demo(args)
    except UsageError as exc:
        print(f"fga-search: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
