"""fga-search: compress trained CNNs by filter group approximation, and search per-layer choices.

The public API is small; everything else lives in private modules. ``import fga_search`` is
lazy (PEP 562): it imports none of them, and so neither torch, optuna, pandas, pyarrow nor ray;
a public name's module is imported the first time the name is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._util._lazy import lazy_names
from ._version import __version__

if TYPE_CHECKING:  # the same names, eagerly, for type checkers and editors
    from .core._fga import FGAConv2d
    from .core._flops import FlopCount, ModelProfile, count_flops
    from .core._geometry import LayerInfo, decomposable_layers
    from .core._plan import KEEP, Plan, load_plan, plan_to_json
    from .core._refine import LayerFit, refine, refinement_report
    from .core._surgery import decompose
    from .data._data import DataBundle, load_dataset
    from .engine._config import RunConfig
    from .engine._search import SearchResult, search
    from .engine._setup import LatencyBudgetError
    from .exporter._export import (
        ExportFormatError,
        ExportResult,
        ExportVerificationError,
        export,
        load_exported,
    )
    from .models._checkpoint import WeightsError
    from .models._loader import Normalization
    from .models._zoo import build_model, list_models, register_model
    from .report._report import write_report
    from .runs._pareto import pareto_front
    from .runs._records import FrontRecord, TrialRecord
    from .train._compress import compress

# public name -> the private module that defines it
_LAZY: dict[str, str] = {
    "KEEP": ".core._plan",
    "DataBundle": ".data._data",
    "ExportFormatError": ".exporter._export",
    "ExportResult": ".exporter._export",
    "ExportVerificationError": ".exporter._export",
    "FGAConv2d": ".core._fga",
    "FlopCount": ".core._flops",
    "FrontRecord": ".runs._records",
    "LatencyBudgetError": ".engine._setup",
    "LayerFit": ".core._refine",
    "LayerInfo": ".core._geometry",
    "ModelProfile": ".core._flops",
    "Normalization": ".models._loader",
    "Plan": ".core._plan",
    "RunConfig": ".engine._config",
    "SearchResult": ".engine._search",
    "TrialRecord": ".runs._records",
    "WeightsError": ".models._checkpoint",
    "build_model": ".models._zoo",
    "compress": ".train._compress",
    "count_flops": ".core._flops",
    "decomposable_layers": ".core._geometry",
    "decompose": ".core._surgery",
    "export": ".exporter._export",
    "list_models": ".models._zoo",
    "load_dataset": ".data._data",
    "load_exported": ".exporter._export",
    "load_plan": ".core._plan",
    "pareto_front": ".runs._pareto",
    "plan_to_json": ".core._plan",
    "refine": ".core._refine",
    "refinement_report": ".core._refine",
    "register_model": ".models._zoo",
    "search": ".engine._search",
    "write_report": ".report._report",
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


__getattr__, __dir__ = lazy_names(__name__, _LAZY, __all__)
