"""The model a search trial builds before fine-tuning, as one public verb: ``compress``.

A trial (``TrialRunner.run``) and ``fga_search.compress`` share these steps, so that a plan and
the run's seed give the same model in both: a fixed batch of ``calibration`` normalized training
images (drawn with the seed), per-group truncated SVD refined on it, then batch-norm statistics
re-estimated on ``recalibration`` training images.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fga_search.core._plan import KEEP, Plan
from fga_search.core._surgery import decompose
from fga_search.data._data import DataBundle
from fga_search.models._loader import DeviceSplit, Normalization

from ._finetune import amp_dtype_for
from ._recalibrate import recalibrate_bn

__all__ = ["build_refined", "calibration_batch", "compress", "trial_seed_of"]


def trial_seed_of(run_seed: int) -> int:
    """A trial's seed: the run's, for every trial (common random numbers: the same calibration,
    recalibration and fine-tuning draws, so that trials differ by their plans only)."""
    return run_seed % (2**31)


def calibration_batch(train: DeviceSplit, count: int, *, seed: int) -> torch.Tensor:
    """The refinement's images: the first ``count`` of the training split shuffled with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return next(train.batches(count, shuffle=True, generator=gen)).x


def build_refined(
    model: nn.Module, plan: Plan, calibration: torch.Tensor, *, mode: str, seed: int
) -> nn.Module:
    """The plan's model, SVD-initialised and refined on ``calibration`` (a copy when every layer
    is kept)."""
    if all(choice == KEEP for choice in plan.values()):
        return copy.deepcopy(model)
    return decompose(model, plan, calibration, mode=mode, seed=seed)


def compress(
    model: nn.Module,
    plan: Plan,
    data: DataBundle,
    *,
    normalization: Normalization,
    seed: int = 0,
    calibration: int = 256,
    recalibration: int = 1024,
    refine_mode: str = "asymmetric",
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Compress a trained ``model`` by ``plan`` exactly as a search trial does before fine-tuning.

    ``data`` gives the training images (``fga_search.load_dataset``, with the run's dataset,
    ``val_fraction`` and data seed: its ``data_seed``, else its ``seed``), ``normalization`` the
    model's input normalization (a run's ``run.json`` records both), ``seed`` the run's ``--seed``.
    The trial's steps: ``calibration`` normalized training images drawn with ``seed`` → per-group SVD refined on them (``refine_mode``)
    → batch-norm statistics re-estimated on ``recalibration`` training images. Scored on
    ``data.val``, the result has the trial's ``proxy_acc``. ``model`` keeps its
    weights; it is moved to ``device`` and put in eval mode.
    """
    for name, value in (("calibration", calibration), ("recalibration", recalibration)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    dev = torch.device(device)
    model = model.to(dev).eval()
    train = DeviceSplit(data.train, device=dev, normalization=normalization)
    trial_seed = trial_seed_of(seed)
    batch = calibration_batch(train, calibration, seed=seed)
    torch.manual_seed(trial_seed)
    student = build_refined(model, plan, batch, mode=refine_mode, seed=trial_seed)
    recalibrate_bn(student, train, images=recalibration, seed=trial_seed, amp_dtype=amp_dtype_for(dev))
    return student.eval()
