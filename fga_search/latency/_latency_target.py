"""Where latency is measured: the ``Target`` (device, threads, batch, dtype, memory format).

It imports torch only when a method needs it: ``RunConfig`` checks a ``--target`` with it, and
``fga-search --help`` lists ``DTYPES``, without loading torch."""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["DTYPES", "RUNTIMES", "Target", "cpu_cores", "default_runtime", "onnxruntime_available"]

# the dtypes a target runs in: the name --target-dtype takes -> the torch dtype's name
DTYPES = {"float32": "float32", "bf16": "bfloat16", "fp16": "float16"}

# the runtimes a target's latency is measured in: eager PyTorch, ONNX Runtime (CPU execution
# provider: float32, its own memory layout) and TorchScript (traced, frozen, optimised for inference)
RUNTIMES = ("eager", "onnxruntime", "torchscript")


def onnxruntime_available() -> bool:
    """Whether ``onnxruntime`` imports here."""
    import importlib.util

    try:
        return importlib.util.find_spec("onnxruntime") is not None
    except (ImportError, ValueError):  # ValueError: a module object without a spec
        return False


def default_runtime(device: str) -> str:
    """Where a target's latency is measured by default: ONNX Runtime on a CPU, where models ship
    in a runtime like it (it runs the original ResNet-56 3-3.5x faster than eager PyTorch on 2
    cores), when it is installed; eager PyTorch on CUDA."""
    return "onnxruntime" if device == "cpu" and onnxruntime_available() else "eager"


def cpu_cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass(frozen=True)
class Target:
    """Where latency is measured. ``threads`` applies to the CPU (None: PyTorch's default);
    ``runtime`` is what runs the model there (``RUNTIMES``)."""

    device: str = "cpu"
    threads: int | None = None
    batch: int = 1
    dtype: str = "float32"
    channels_last: bool = False
    runtime: str = "eager"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"target dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.batch < 1:
            raise ValueError(f"target batch must be >= 1, got {self.batch}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"target threads must be >= 1, got {self.threads}")
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            raise ValueError(f"target device must be cpu or cuda[:N], got {self.device!r}")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"target runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if self.runtime == "onnxruntime":
            if self.device != "cpu":
                raise ValueError(
                    f"target runtime onnxruntime is measured on the CPU here, got device {self.device!r} "
                    "(use --target-runtime eager or torchscript on CUDA)"
                )
            if self.dtype != "float32":
                raise ValueError(f"target runtime onnxruntime runs float32 here, got dtype {self.dtype!r}")
            if self.channels_last:
                raise ValueError(
                    "target runtime onnxruntime chooses its own memory layout: --target-memory-format "
                    "channels_last applies to eager and torchscript"
                )
            if not onnxruntime_available():
                raise ValueError(
                    "target runtime onnxruntime needs the onnxruntime package, which is not installed: "
                    "pip install onnxruntime (or use --target-runtime eager)"
                )

    @classmethod
    def parse(
        cls,
        spec: str,
        *,
        batch: int = 1,
        dtype: str = "float32",
        channels_last: bool | None = None,
        runtime: str | None = None,
    ) -> Target:
        """``cpu``, ``cpu:THREADS``, ``cuda`` or ``cuda:INDEX``; ``runtime`` None: the device's
        ``default_runtime`` (eager where a dtype other than float32 or channels_last is asked for
        on a CPU, which ONNX Runtime does not run)."""
        kind, _, arg = spec.partition(":")
        if kind == "cpu":
            if arg and not arg.isdigit():
                raise ValueError(f"--target {spec!r}: cpu:THREADS needs a thread count, e.g. cpu:2")
            if arg and int(arg) < 1:
                raise ValueError(f"--target {spec!r}: cpu:THREADS needs at least 1 thread")
            if runtime is None:
                runtime = "eager" if dtype != "float32" or channels_last else default_runtime("cpu")
            return cls("cpu", int(arg) if arg else None, batch, dtype, bool(channels_last), runtime)
        if kind == "cuda":
            if arg and not arg.isdigit():
                raise ValueError(f"--target {spec!r}: cuda:INDEX needs a device index, e.g. cuda:0")
            layout = True if channels_last is None else channels_last
            return cls(spec, None, batch, dtype, layout, runtime or default_runtime("cuda"))
        raise ValueError(f"--target {spec!r}: use cpu, cpu:THREADS, cuda or cuda:INDEX")

    @property
    def torch_device(self) -> torch.device:
        import torch

        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        dtype: torch.dtype = getattr(torch, DTYPES[self.dtype])
        return dtype

    def hardware(self) -> str:
        import torch

        if self.device == "cpu":
            threads = self.threads or torch.get_num_threads()
            return f"{_cpu_name()} ({threads} threads)"
        if not torch.cuda.is_available():
            raise ValueError(f"target {self.device!r} asked for, but CUDA is not available here")
        return torch.cuda.get_device_name(self.torch_device)

    def oversubscribed(self) -> str | None:
        """Why this target's CPU latencies would mislead, or None: a thread count above the cores
        this process may run on times an oversubscribed CPU, not the deployment."""
        cores = cpu_cores()
        if self.device == "cpu" and self.threads is not None and self.threads > cores:
            return (
                f"--target cpu:{self.threads} asks for {self.threads} threads, but this process has "
                f"{cores} core(s): latencies are measured oversubscribed"
            )
        return None

    def key(self) -> str:
        """The lookup-table key of this target: hardware, dtype, batch, memory format and runtime
        (eager PyTorch's key has no runtime part: tables and runs made before runtimes existed
        keep theirs)."""
        import torch

        layout = "channels_last" if self.channels_last else "nchw"
        key = f"{self.hardware()}|{self.dtype}|batch {self.batch}|{layout}|torch {torch.__version__}"
        if self.runtime == "onnxruntime":
            import onnxruntime

            key += f"|onnxruntime {onnxruntime.__version__}"
        elif self.runtime == "torchscript":
            key += "|torchscript"
        return key

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "hardware": self.hardware()}
