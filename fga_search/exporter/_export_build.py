"""Export stages 2 and 3: rebuild the picked trial's model (its checkpoint, or the trial re-run
from its plan and seed), and fine-tune it further on train + validation (``--finetune-epochs``)."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fga_search._util._errors import first_line
from fga_search.runs._runview import RunView

from ._export_select import ExportOptions, Picked

if TYPE_CHECKING:
    from fga_search.core._plan import Plan
    from fga_search.engine._setup import SearchSetup
    from fga_search.models._loader import DeviceSplit
    from fga_search.runs._records import TrialRecord
    from fga_search.train._trial import TrialRunner

__all__ = ["Trained", "rebuild", "trained_model"]


def rebuild(
    view: RunView, setup: SearchSetup, runner: TrialRunner, picked: Picked, *, quiet: bool
) -> tuple[nn.Module, bool]:
    """The picked trial's model in eval mode on the runner's device, and whether it was re-run:
    the run folder keeps the front members' weights; any other trial is re-run with its seed
    (deterministically; a line on stderr unless ``quiet``)."""
    from fga_search.core._surgery import apply_plan_structure

    path = view.folder.checkpoint(int(picked.source["trial"]))
    if os.path.isfile(path):
        model = apply_plan_structure(copy.deepcopy(setup.model).cpu(), picked.plan)
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as exc:
            first = first_line(exc)
            raise ValueError(f"cannot load {path}: {first}") from None
        model = model.to(runner.device).eval()
        if runner.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model, False
    if not quiet:
        print(
            f"re-running trial {int(picked.source['trial'])} from its plan and seed",
            file=sys.stderr,
            flush=True,
        )
    return _rerun(view, runner, picked.plan, picked.seed, picked.source).eval(), True


def _rerun(view: RunView, runner: TrialRunner, plan: Plan, seed: int, row: TrialRecord) -> nn.Module:
    """A trial's model again, as its trial trained it: for its recorded epochs (a rung's, with
    --rungs), and a promotion that continued goes on from its source trial's model, rebuilt first."""
    if row.continued and row.promoted_from is not None and row.epochs is not None:
        source = next(r for r in view.rows if r.trial == row.promoted_from)
        start = _rerun(view, runner, plan, seed, source)
        return runner.run(
            plan,
            seed=seed,
            epochs=float(row.epochs) - float(source.epochs or 0.0),
            init_state=start.state_dict(),
            measure_latency=False,
        ).model
    epochs = None if row.epochs is None else float(row.epochs)
    return runner.run(plan, seed=seed, epochs=epochs, measure_latency=row.rung is None or row.rung == 0).model


def _full_training_split(setup: SearchSetup, runner: TrialRunner) -> DeviceSplit:
    """The training and validation images (not validation images taken from the test split)."""
    from fga_search.models._loader import DeviceSplit

    full = setup.data.final_training_split()
    return DeviceSplit(
        full, device=runner.device, normalization=setup.normalization, channels_last=runner.channels_last
    )


def _final_finetune(
    model: nn.Module,
    setup: SearchSetup,
    runner: TrialRunner,
    *,
    epochs: float,
    seed: int,
    lr: float | None = None,
    batch_size: int | None = None,
    quiet: bool,
) -> dict[str, Any]:
    """Fine-tune longer on train + validation with distillation from the original model (run on
    every batch, since random crops make cached logits useless). ``lr`` and ``batch_size``
    default to the run's trial settings. Unless ``quiet``, a line per epoch goes to stderr.
    Returns spec.json's ``finetune`` record."""
    from fga_search._util._progress import format_seconds
    from fga_search.train._finetune import FinetuneProgress, finetune
    from fga_search.train._recalibrate import recalibrate_bn

    data = setup.data
    split = _full_training_split(setup, runner)
    config = dataclasses.replace(
        setup.settings.finetune,
        epochs=float(epochs),
        crop=True,
        flip=True,
        lr=setup.settings.finetune.lr if lr is None else float(lr),
        batch_size=setup.settings.finetune.batch_size if batch_size is None else int(batch_size),
    )

    def report(p: FinetuneProgress) -> None:
        eta = p.seconds / p.step * (p.steps - p.step)
        print(
            f"final fine-tune: epoch {p.epochs_done:.4g}/{config.epochs:g} (step {p.step}/{p.steps})  "
            f"loss {p.loss:.4f}  {format_seconds(p.seconds)} | ETA {format_seconds(eta)}",
            file=sys.stderr,
            flush=True,
        )

    what = "train" if setup.data.val_source == "test" else "train+val"  # never the test split's images
    if not quiet:
        print(
            f"final fine-tune: {config.epochs:g} epochs on {len(split)} {what} images, batch "
            f"{config.batch_size}, peak learning rate {config.lr:g}, the original as teacher",
            file=sys.stderr,
            flush=True,
        )
    stats = finetune(
        model,
        split,
        config=config,
        teacher=runner.model,
        allow_flip=data.flip,
        crop_pad=data.crop_pad,
        seed=seed,
        on_epoch=None if quiet else report,
    )
    if stats.steps < setup.settings.recalibrate_after_steps:
        recalibrate_bn(model, split, images=setup.settings.recalibration, seed=seed, amp_dtype=runner.amp)
    return {
        "epochs": float(epochs),
        "data": what,
        "images": len(split),
        "steps": stats.steps,
        "final_loss": None if math.isnan(stats.final_loss) else stats.final_loss,
        "teacher": "the original model, run on every batch",
        "augment": {"crop_pad": data.crop_pad if config.crop else 0, "flip": bool(config.flip and data.flip)},
        "recipe": config.to_dict(),
    }


@dataclass(frozen=True)
class Trained:
    """Stages 2-3: the model to export, as trained, on the CPU."""

    model: nn.Module
    rebuilt: bool  # re-run from its plan and seed (no checkpoint)
    finetune: dict[str, Any] | None  # spec.json's ``finetune`` (None: not fine-tuned further)
    val_acc: float
    test_acc: float


def trained_model(
    view: RunView, setup: SearchSetup, runner: TrialRunner, picked: Picked, options: ExportOptions
) -> Trained:
    """Stages 2 and 3: rebuild the picked model (:func:`rebuild`), fine-tune it further
    (``options.finetune_epochs``), measure its validation and test accuracy, and bring it to the
    CPU."""
    model, rebuilt = rebuild(view, setup, runner, picked, quiet=options.quiet)
    finetuned = None
    if options.finetune_epochs > 0:
        finetuned = _final_finetune(
            model,
            setup,
            runner,
            epochs=options.finetune_epochs,
            seed=picked.seed,
            lr=options.finetune_lr,
            batch_size=options.finetune_batch_size,
            quiet=options.quiet,
        )
    val_acc = runner.evaluate(model, split="val")
    test_acc = runner.evaluate(model, split="test")
    model = model.cpu().to(memory_format=torch.contiguous_format).eval()
    return Trained(model, rebuilt, finetuned, val_acc, test_acc)
