"""One trial: build the plan's model from the trained one, recalibrate, fine-tune, evaluate.

A ``TrialRunner`` holds what every trial shares and is built once per search (per worker with
Ray): the trained model on the device, the data on the device as uint8, a fixed calibration
batch, the teacher's cached logits and the model's FLOPs profile.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fga_search.core._flops import ModelProfile, measure_macs
from fga_search.core._plan import KEEP, Plan
from fga_search.data._data import DataBundle
from fga_search.latency import Target, measure_as_exported, measure_side_by_side_as_exported
from fga_search.models._loader import DeviceSplit, Normalization

from ._compress import build_refined, calibration_batch
from ._evaluate import evaluate
from ._finetune import FinetuneConfig, TeacherCache, amp_dtype_for, finetune
from ._recalibrate import recalibrate_bn

__all__ = ["OverBudget", "TrialOutcome", "TrialRunner", "TrialSettings", "resolve_device"]


def resolve_device(name: str | None) -> torch.device:
    """``None`` means CUDA when available, else CPU; ``cuda`` / ``cuda:N`` must exist."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"unsupported device {name!r}; use cpu, cuda or cuda:N")
    return device


@dataclass(frozen=True)
class TrialSettings:
    """What every trial does; the defaults are documented in docs/search.md."""

    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    calibration: int = 256  # images for data-driven refinement
    recalibration: int = 1024  # images for BN recalibration
    refine_mode: str = "asymmetric"
    eval_batch: int = 512  # the setup uses 64 on CPUs (faster there: scripts/bench_eval.py)
    device_data_bytes: int = 8 * 2**30  # larger splits stay in pinned host memory
    cudnn_benchmark: bool = False  # autotune cuDNN kernels for each new shape during trials
    recalibrate_after_steps: int = 200  # re-estimate BN statistics after fine-tunes shorter than this
    latency_target: Target | None = None  # measure each trial's model there, before fine-tuning
    latency_base_ms: float | None = None  # the original model's latency on that target
    max_latency_ratio: float | None = None  # a latency budget: slower models are never fine-tuned


class OverBudget(Exception):
    """The built model measures over the latency budget: it is not fine-tuned."""

    def __init__(self, latency_ms: float, ratio: float) -> None:
        super().__init__(
            f"measured latency {latency_ms:.3f} ms is {ratio:.3f} of the original's, over the budget"
        )
        self.latency_ms = latency_ms
        self.ratio = ratio


@dataclass
class TrialOutcome:
    val_acc: float
    proxy_acc: float
    macs: int
    macs_measured: int
    params: int
    seconds: dict[str, float]
    finetune_steps: int
    model: nn.Module
    latency_ms: float | None = None
    latency_ratio: float | None = None

    def metrics(self) -> dict[str, Any]:
        return {
            "val_acc": self.val_acc,
            "proxy_acc": self.proxy_acc,
            "macs": self.macs,
            "macs_measured": self.macs_measured,
            "params": self.params,
            "finetune_steps": self.finetune_steps,
            "latency_ms": self.latency_ms,
            "latency_ratio": self.latency_ratio,
            **{f"seconds_{k}": v for k, v in self.seconds.items()},
        }


class TrialRunner:
    def __init__(
        self,
        *,
        model: nn.Module,
        data: DataBundle,
        normalization: Normalization,
        device: torch.device,
        settings: TrialSettings,
        seed: int = 0,
        profile: ModelProfile | None = None,
    ) -> None:
        self.device = device
        self.settings = settings
        self.data = data
        cuda = device.type == "cuda"
        self.channels_last = cuda
        self.model = model.to(device).eval()
        if cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
            # Every trial brings new FGA conv shapes; autotuning each of them cost 2-4 s per
            # 1-epoch trial on an H200, more than it saves (latency measurement still autotunes).
            torch.backends.cudnn.benchmark = settings.cudnn_benchmark
        self.profile = profile or ModelProfile(model, input_shape=data.input_shape)
        split = {
            "device": device,
            "normalization": normalization,
            "channels_last": cuda,
            "max_device_bytes": settings.device_data_bytes,
        }
        self.train = DeviceSplit(data.train, **split)  # type: ignore[arg-type]
        self.val = DeviceSplit(data.val, **split)  # type: ignore[arg-type]
        self._test_split = data.test
        self._split_kwargs = split
        self._test: DeviceSplit | None = None
        self.calibration = calibration_batch(self.train, settings.calibration, seed=seed)
        self.teacher = TeacherCache(self.model, self.train, num_classes=data.num_classes)
        self.amp = amp_dtype_for(device)

    @property
    def test(self) -> DeviceSplit:
        if self._test is None:
            self._test = DeviceSplit(self._test_split, **self._split_kwargs)  # type: ignore[arg-type]
        return self._test

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def evaluate(self, model: nn.Module, *, split: str = "val") -> float:
        data = self.val if split == "val" else self.test
        return evaluate(model, data, batch_size=self.settings.eval_batch, amp_dtype=self.amp)

    def build(self, plan: Plan, *, seed: int) -> nn.Module:
        """The plan's model, SVD-initialised and refined on the calibration batch."""
        return build_refined(self.model, plan, self.calibration, mode=self.settings.refine_mode, seed=seed)

    def run(
        self,
        plan: Plan,
        *,
        seed: int,
        epochs: float | None = None,
        init_state: Mapping[str, torch.Tensor] | None = None,
        measure_latency: bool = True,
        on_phase: Callable[[str], None] | None = None,
    ) -> TrialOutcome:
        """Run the trial's phases; exceptions (a NaN loss, out of memory) propagate to the caller.

        ``epochs``: fine-tuning epochs (default: the settings'). ``init_state``: the weights to go
        on from (a promoted rung's trial: the plan's model as the rung below left it, BN statistics
        included), fine-tuned with a schedule of its own (warm-up, then decay to zero).
        ``measure_latency=False`` skips the latency target (a plan measured at the rung below)."""
        seconds: dict[str, float] = {}
        start = t = time.perf_counter()

        def lap(phase: str) -> None:
            nonlocal t
            self._sync()
            now = time.perf_counter()
            seconds[phase] = now - t
            t = now
            if on_phase is not None:
                on_phase(phase)

        torch.manual_seed(seed)
        student = self.build(plan, seed=seed)
        if self.channels_last:
            student = student.to(memory_format=torch.channels_last)
        lap("decompose")
        latency_ms = ratio = None
        s = self.settings
        if s.latency_target is not None and measure_latency:
            assert s.latency_base_ms is not None
            if all(choice == KEEP for choice in plan.values()):
                # the original itself (e.g. every layer kept dense on a GPU target): its ratio is
                # 1 by definition, and timing it against itself would only add noise to a budget of 1
                latency_ms, ratio = s.latency_base_ms, 1.0
            elif s.latency_target.device == "cpu":
                # side by side with the original: a shared CPU's speed drifts over minutes (on
                # these machines the original ResNet-56 ran at 3.8 ms for a while, 7 ms for another)
                ms = measure_side_by_side_as_exported(
                    {"original": self.model, "trial": student},
                    input_shape=self.data.input_shape,
                    target=s.latency_target,
                )
                latency_ms, ratio = ms["trial"], ms["trial"] / ms["original"]
            else:
                latency_ms = measure_as_exported(
                    student, input_shape=self.data.input_shape, target=s.latency_target
                )
                ratio = latency_ms / s.latency_base_ms
            lap("latency")
            if s.max_latency_ratio is not None and ratio > s.max_latency_ratio:
                raise OverBudget(latency_ms, ratio)
        if init_state is None:
            recalibrate_bn(
                student, self.train, images=self.settings.recalibration, seed=seed, amp_dtype=self.amp
            )
        else:
            student.load_state_dict(init_state)
        lap("recalibrate")
        proxy = self.evaluate(student)
        lap("proxy")
        steps = 0
        val = proxy
        config = self.settings.finetune
        if epochs is not None:
            config = dataclasses.replace(config, epochs=epochs)
        if config.epochs > 0:
            stats = finetune(
                student,
                self.train,
                config=config,
                teacher=self.teacher,
                allow_flip=self.data.flip,
                crop_pad=self.data.crop_pad,
                seed=seed,
            )
            steps = stats.steps
            if steps < self.settings.recalibrate_after_steps:
                # A few SGD steps leave batch-norm running statistics noisy: re-estimate them.
                recalibrate_bn(
                    student, self.train, images=self.settings.recalibration, seed=seed, amp_dtype=self.amp
                )
            lap("finetune")
            val = self.evaluate(student)
            lap("eval")
        else:
            seconds["finetune"] = seconds["eval"] = 0.0
        cost = self.profile.count(plan, validate=False)
        measured = measure_macs(student, input_shape=self.data.input_shape)
        lap("flops")
        seconds["total"] = time.perf_counter() - start
        return TrialOutcome(
            val_acc=val,
            proxy_acc=proxy,
            macs=cost.macs,
            macs_measured=measured,
            params=cost.params,
            seconds=seconds,
            finetune_steps=steps,
            model=student,
            latency_ms=latency_ms,
            latency_ratio=ratio,
        )
