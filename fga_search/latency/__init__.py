"""Latency on the deployment target: whole models and single layers, with an on-disk lookup table.

FLOPs are not speed: an FGA pair at a fifth of a conv's FLOPs can run slower than the conv. This
module measures what a target actually does.

* ``Target``: where and how a model runs: ``cpu`` with N threads or ``cuda``, batch size, dtype
  (float32, bf16, fp16) and memory format (channels_last).
* ``measure_latency``: warm-up, then repeated timed forward passes; the median. On CUDA it
  times with CUDA events, with ``cudnn.benchmark`` on.
* ``LatencyTable``: per-layer latencies (a dense conv, or an FGA pair) cached on disk, keyed by
  the target (device name, dtype, batch, memory format) and the layer's geometry (c, n, kernel,
  stride, padding, dilation, conv groups, input size, g, r), so a search measures each candidate
  once. A table file belongs to one target: a file written for another device is ignored.
* ``LatencyModel``: a whole-model estimate for any plan = the measured original model plus the
  plan's per-layer changes from the table (a plan's layer minus the dense conv it replaces),
  scaled by one factor that ``calibrate`` fits to one measured whole plan (the search calibrates
  on its fastest plan). Ranks between measured anchors are interpolated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fga_search._util._lazy import lazy_names

if TYPE_CHECKING:  # the same names, eagerly, for type checkers and editors
    from ._latency_measure import (
        LatencyStats,
        as_deployed,
        block_diagonal_copy,
        measure_as_exported,
        measure_latency,
        measure_side_by_side,
        measure_side_by_side_as_exported,
    )
    from ._latency_table import LatencyModel, LatencyTable
    from ._latency_target import Target, cpu_cores

# public name -> the private module that defines it: importing this package (or its torch-free
# _latency_target, as the command line's option table does) imports neither torch nor the others
_LAZY: dict[str, str] = {
    "LatencyModel": "._latency_table",
    "LatencyStats": "._latency_measure",
    "LatencyTable": "._latency_table",
    "Target": "._latency_target",
    "as_deployed": "._latency_measure",
    "block_diagonal_copy": "._latency_measure",
    "cpu_cores": "._latency_target",
    "measure_as_exported": "._latency_measure",
    "measure_latency": "._latency_measure",
    "measure_side_by_side": "._latency_measure",
    "measure_side_by_side_as_exported": "._latency_measure",
}

__all__ = [
    "LatencyModel",
    "LatencyStats",
    "LatencyTable",
    "Target",
    "as_deployed",
    "block_diagonal_copy",
    "cpu_cores",
    "measure_as_exported",
    "measure_latency",
    "measure_side_by_side",
    "measure_side_by_side_as_exported",
]


__getattr__, __dir__ = lazy_names(__name__, _LAZY, __all__)
