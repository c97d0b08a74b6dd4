"""Fine-tuning with knowledge distillation from the original model.

Loss = ``kd_alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - kd_alpha) * CE``.
Defaults (``FinetuneConfig``): SGD with Nesterov momentum 0.9, weight decay 5e-4 on conv and
linear weights, peak learning rate 0.02 with a 10 % linear warm-up and a linear decay to zero,
batch 128, KD weight 0.9 at temperature 4, horizontal flips (when the dataset allows them) and no
random crops, so that the teacher's logits can be cached (see ``TeacherCache``). On CUDA it uses
bf16 autocast where supported and channels_last. Training from scratch is the same loop with no
teacher (``kd_alpha`` ignored).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fga_search.models._loader import Augment, Batch, DeviceSplit

from ._evaluate import autocast, main_logits

__all__ = ["FinetuneConfig", "FinetuneProgress", "FinetuneStats", "TeacherCache", "amp_dtype_for", "finetune"]


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: float = 1.0
    batch_size: int = 128
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup: float = 0.1  # fraction of the steps
    kd_alpha: float = 0.9
    kd_temperature: float = 4.0
    label_smoothing: float = 0.0
    flip: bool = True  # only where the dataset allows it
    crop: bool = False  # random crops make teacher logits uncacheable
    grad_clip: float = 5.0
    compile: bool = False  # torch.compile the student for the training steps

    def __post_init__(self) -> None:
        if not (self.epochs >= 0 and math.isfinite(self.epochs)):
            raise ValueError(f"epochs must be a finite number >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.kd_alpha <= 1.0:
            raise ValueError(f"kd_alpha must be in [0, 1], got {self.kd_alpha}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class FinetuneStats:
    steps: int
    images: int
    seconds: float
    final_loss: float


@dataclass(frozen=True)
class FinetuneProgress:
    """Where a fine-tune stands, passed to ``finetune``'s ``on_epoch`` after each epoch."""

    step: int
    steps: int
    epochs_done: float  # images seen / training images
    loss: float  # the loss of the latest batch
    seconds: float  # since the fine-tune started


def amp_dtype_for(device: torch.device) -> torch.dtype | None:
    """bf16 on GPUs that support it, else full precision."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


class TeacherCache:
    """The original model's logits on training images, computed once per image and orientation.

    Trials fine-tune on un-cropped (optionally flipped) images, so the teacher's logits for an
    image never change: each is computed the first time a batch needs it and reused by every
    later step and trial, instead of a teacher forward pass per step.
    """

    def __init__(self, teacher: nn.Module, data: DeviceSplit, *, num_classes: int) -> None:
        self.teacher = teacher.eval()
        self.data = data
        self.amp_dtype = amp_dtype_for(data.device)
        n = len(data)
        self.logits = torch.zeros(2, n, num_classes, device=data.device)
        self.known = torch.zeros(2, n, dtype=torch.bool, device=data.device)
        self.computed = 0

    @torch.no_grad()
    def __call__(self, batch: Batch) -> torch.Tensor:
        side = batch.flipped.long()
        rows = torch.nonzero(~self.known[side, batch.index]).flatten()
        if len(rows):
            # Pad the missing rows to a power of two (repeating the first): a handful of batch
            # shapes instead of one per count, so cuDNN does not re-tune for every step.
            size = min(len(batch.index), 1 << (len(rows) - 1).bit_length())
            rows = torch.cat([rows, rows[:1].expand(size - len(rows))])
            with autocast(self.data.device, self.amp_dtype):
                out = main_logits(self.teacher(batch.x[rows])).float()
            self.logits[side[rows], batch.index[rows]] = out
            self.known[side[rows], batch.index[rows]] = True
            self.computed += len(rows)
        return self.logits[side, batch.index]


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_weight = name == "weight" and isinstance(module, (nn.Conv2d, nn.Linear))
            (decay if is_weight else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def finetune(
    model: nn.Module,
    data: DeviceSplit,
    *,
    config: FinetuneConfig,
    teacher: TeacherCache | nn.Module | None = None,
    allow_flip: bool = True,
    crop_pad: int = 0,
    seed: int = 0,
    on_epoch: Callable[[FinetuneProgress], None] | None = None,
) -> FinetuneStats:
    """Train ``model`` in place for ``config.epochs`` epochs (fractions allowed) over ``data``.

    ``teacher`` is a :class:`TeacherCache` (cached logits, no random crops) or a model run on
    every batch. ``on_epoch`` is called after every full epoch's worth of steps and after the
    last step (reading the loss then syncs a GPU, once per epoch). Raises ``FloatingPointError``
    on a non-finite loss.
    """
    start = time.perf_counter()
    n = len(data)
    total_images = round(config.epochs * n)
    # Never more images than asked: under one batch's worth, one step of that many images.
    batch_size = min(config.batch_size, total_images)
    steps = total_images // batch_size if batch_size else 0
    if steps == 0:
        return FinetuneStats(0, 0, 0.0, float("nan"))
    if isinstance(teacher, TeacherCache) and config.crop:
        raise ValueError("cached teacher logits need crop=False")
    device = data.device
    amp = amp_dtype_for(device)
    opt = torch.optim.SGD(
        _param_groups(model, config.weight_decay),
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.momentum > 0,
    )
    warm = max(1, int(config.warmup * steps))
    steps_per_epoch = max(1, n // batch_size)

    def lr_at(step: int) -> float:
        if step < warm:
            return config.lr * (step + 1) / warm
        return config.lr * max(0.0, (steps - step) / max(1, steps - warm))

    augment = Augment(crop_pad=crop_pad if config.crop else 0, flip=config.flip and allow_flip)
    forward = torch.compile(model) if config.compile else model
    gen = torch.Generator().manual_seed(seed)
    model.train()
    step = 0
    seen = 0
    loss_value = float("nan")
    t = config.kd_temperature
    while step < steps:
        for batch in data.batches(
            batch_size, shuffle=True, augment=augment, generator=gen, drop_last=n >= batch_size
        ):
            if step >= steps:
                break
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            with autocast(device, amp):
                logits = main_logits(forward(batch.x)).float()
            loss = F.cross_entropy(logits, batch.y, label_smoothing=config.label_smoothing)
            if teacher is not None and config.kd_alpha > 0:
                if isinstance(teacher, TeacherCache):
                    target = teacher(batch)
                else:
                    with torch.no_grad(), autocast(device, amp):
                        target = main_logits(teacher(batch.x)).float()
                kd = F.kl_div(
                    F.log_softmax(logits / t, 1),
                    F.log_softmax(target / t, 1),
                    reduction="batchmean",
                    log_target=True,
                )
                loss = config.kd_alpha * t * t * kd + (1 - config.kd_alpha) * loss
            if (step % 16 == 0 or step == steps - 1) and not torch.isfinite(loss):  # checks sync a GPU
                raise FloatingPointError(f"non-finite loss at step {step} of {steps}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            opt.step()
            step += 1
            seen += len(batch.y)
            reporting = on_epoch is not None and step % steps_per_epoch == 0
            if step == steps or reporting:
                loss_value = float(loss.detach())  # one read (a GPU sync) for both uses
                if on_epoch is not None:
                    on_epoch(
                        FinetuneProgress(
                            step=step,
                            steps=steps,
                            epochs_done=seen / n,
                            loss=loss_value,
                            seconds=time.perf_counter() - start,
                        )
                    )
    model.eval()
    return FinetuneStats(steps=step, images=seen, seconds=time.perf_counter() - start, final_loss=loss_value)
