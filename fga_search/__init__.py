"""fga-search: compress trained CNNs by filter group approximation, and search per-layer choices.

The public API is small; everything else lives in private modules. ``import fga_search`` is
lazy (PEP 562): it imports none of them, and so neither torch, optuna, pandas, pyarrow nor ray;
a public name's module is imported the first time the name is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:  # the same names, eagerly, for type checkers and editors
    from ._checkpoint import WeightsError
    from ._compress import compress
    from ._config import RunConfig
    from ._data import DataBundle, load_dataset
    from ._export import (
        ExportFormatError,
        ExportResult,
        ExportVerificationError,
        export,
        load_exported,
    )
    from ._fga import FGAConv2d
    from ._flops import FlopCount, ModelProfile, count_flops
    from ._geometry import LayerInfo, decomposable_layers
    from ._loader import Normalization
    from ._pareto import pareto_front
    from ._plan import KEEP, Plan, load_plan, plan_to_json
    from ._records import FrontRecord, TrialRecord
    from ._refine import LayerFit, refine, refinement_report
    from ._report import write_report
    from ._search import SearchResult, search
    from ._setup import LatencyBudgetError
    from ._surgery import decompose
    from ._zoo import build_model, list_models, register_model

# public name -> the private module that defines it
_LAZY: dict[str, str] = {
    "KEEP": "._plan",
    "DataBundle": "._data",
    "ExportFormatError": "._export",
    "ExportResult": "._export",
    "ExportVerificationError": "._export",
    "FGAConv2d": "._fga",
    "FlopCount": "._flops",
    "FrontRecord": "._records",
    "LatencyBudgetError": "._setup",
    "LayerFit": "._refine",
    "LayerInfo": "._geometry",
    "ModelProfile": "._flops",
    "Normalization": "._loader",
    "Plan": "._plan",
    "RunConfig": "._config",
    "SearchResult": "._search",
    "TrialRecord": "._records",
    "WeightsError": "._checkpoint",
    "build_model": "._zoo",
    "compress": "._compress",
    "count_flops": "._flops",
    "decomposable_layers": "._geometry",
    "decompose": "._surgery",
    "export": "._export",
    "list_models": "._zoo",
    "load_dataset": "._data",
    "load_exported": "._export",
    "load_plan": "._plan",
    "pareto_front": "._pareto",
    "plan_to_json": "._plan",
    "refine": "._refine",
    "refinement_report": "._refine",
    "register_model": "._zoo",
    "search": "._search",
    "write_report": "._report",
}

__all__ = [
    "KEEP",
    "DataBundle",
    "ExportFormatError",
    "ExportResult",
    "ExportVerificationError",
    "FGAConv2d",
    "FlopCount",
    "FrontRecord",
    "LatencyBudgetError",
    "LayerFit",
    "LayerInfo",
    "ModelProfile",
    "Normalization",
    "Plan",
    "RunConfig",
    "SearchResult",
    "TrialRecord",
    "WeightsError",
    "__version__",
    "build_model",
    "compress",
    "count_flops",
    "decomposable_layers",
    "decompose",
    "export",
    "list_models",
    "load_dataset",
    "load_exported",
    "load_plan",
    "pareto_front",
    "plan_to_json",
    "refine",
    "refinement_report",
    "register_model",
    "search",
    "write_report",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # once: later uses do not come back here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
