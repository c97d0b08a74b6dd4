"""Live progress for long searches: trials done, the best result within budget so far, and an ETA."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress", "format_seconds"]


def format_seconds(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    def __init__(self, *, total: int, done: int, stream: TextIO | None = None, quiet: bool = False) -> None:
        self.total = total
        self.done_at_start = done
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.start = time.perf_counter()

    def eta(self, done: int) -> float | None:
        here = done - self.done_at_start
        if here <= 0:
            return None
        return (time.perf_counter() - self.start) / here * max(0, self.total - done)

    def line(
        self,
        *,
        done: int,
        number: int,
        status: str,
        val_acc: float | None,
        ratio: float | None,
        seconds: float | None,
        best: tuple[int, float, float] | None,
    ) -> str:
        parts = [f"[{done}/{self.total}] trial {number} {status}"]
        if val_acc is not None and ratio is not None:
            parts.append(f"acc {val_acc:.4f} at FLOPs {ratio:.3f}")
        if seconds is not None:
            parts.append(f"{seconds:.1f}s")
        text = "  ".join(parts)
        if best is not None:
            text += f" | best within budget: {best[1]:.4f} at FLOPs {best[2]:.3f} (trial {best[0]})"
        eta = self.eta(done)
        if eta is not None:
            text += f" | ETA {format_seconds(eta)}"
        return text

    def update(self, **kwargs) -> None:  # type: ignore[no-untyped-def]
        if not self.quiet:
            print(self.line(**kwargs), file=self.stream, flush=True)

    def note(self, message: str) -> None:
        if not self.quiet:
            print(message, file=self.stream, flush=True)
