"""fga-search: compress trained CNNs by filter group approximation, and search per-layer choices.

The public API is small; everything else lives in private modules.
"""

from __future__ import annotations

from ._checkpoint import WeightsError
from ._data import DataBundle, load_dataset
from ._export import ExportResult, export, load_exported
from ._fga import FGAConv2d
from ._flops import FlopCount, ModelProfile, count_flops
from ._geometry import LayerInfo, decomposable_layers
from ._pareto import pareto_front
from ._plan import KEEP, Plan, load_plan, plan_to_json
from ._refine import LayerFit, refine, refinement_report
from ._report import write_report
from ._search import SearchResult, search
from ._surgery import decompose
from ._zoo import build_model, list_models, register_model

__version__ = "0.1.0"

__all__ = [
    "KEEP",
    "DataBundle",
    "ExportResult",
    "FGAConv2d",
    "FlopCount",
    "LayerFit",
    "LayerInfo",
    "ModelProfile",
    "Plan",
    "SearchResult",
    "WeightsError",
    "__version__",
    "build_model",
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
