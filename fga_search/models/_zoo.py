"""The model zoo: CIFAR models, torchvision classifiers by name, and user factories.

A model is named one of three ways:

* a zoo name (``resnet56``, ``vgg16_cifar``, ``digits_cnn``, ...; see :func:`list_models`);
* a torchvision classification model name (``resnet50``, ``mobilenet_v2``, ...);
* ``package.module:factory`` for a user model, called as ``factory(num_classes=K)``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from fga_search._util._errors import first_line, shorten

from ._checkpoint import load_state_dict_file, load_weights
from ._cifar_models import CIFAR10_MEAN, CIFAR10_STD, CifarResNet, CifarVGG, DigitsCNN
from ._loader import Normalization

__all__ = ["ModelSpec", "build_model", "list_models", "register_model", "resolve_model"]


@dataclass(frozen=True)
class ModelSpec:
    """How to build a model: where it comes from, its name, and its default search space."""

    source: str  # "zoo", "torchvision" or "factory"
    name: str
    space: str = "default"
    normalization: Normalization | None = None  # None: the dataset's own channel statistics

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "name": self.name, "space": self.space}


@dataclass(frozen=True)
class _Entry:
    factory: Callable[..., nn.Module]
    space: str
    normalization: Normalization | None


_ZOO: dict[str, _Entry] = {}
IMAGENET = Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
CIFAR10 = Normalization(mean=CIFAR10_MEAN, std=CIFAR10_STD)
DIGITS = Normalization(mean=(0.3058,), std=(0.3763,))  # scikit-learn's digits, scaled to [0, 1]


def register_model(
    name: str,
    factory: Callable[..., nn.Module],
    *,
    space: str = "default",
    normalization: Normalization | None = None,
) -> None:
    """Add a model to the zoo. ``factory(num_classes=K)`` must build it. Duplicate names are refused.

    ``normalization`` is the input normalization the model was trained with (None: the dataset's own).
    """
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"name must be a non-empty string without ':', got {name!r}")
    if name in _ZOO:
        raise ValueError(f"model {name!r} is already registered; registered models: {sorted(_ZOO)}")
    _ZOO[name] = _Entry(factory, space, normalization)


for _depth in (20, 32, 44, 56, 110):
    register_model(
        f"resnet{_depth}",
        lambda num_classes=10, _d=_depth: CifarResNet(_d, num_classes),
        space="resnet_cifar",
        normalization=CIFAR10,
    )
register_model(
    "vgg16_cifar",
    lambda num_classes=10: CifarVGG(num_classes=num_classes),
    space="vgg_cifar",
    normalization=CIFAR10,
)
register_model("digits_cnn", lambda num_classes=10: DigitsCNN(num_classes=num_classes), normalization=DIGITS)


def _torchvision_names() -> list[str]:
    import torchvision.models

    return sorted(torchvision.models.list_models(module=torchvision.models))


def list_models() -> list[str]:
    """The zoo's own model names (torchvision names and ``pkg.module:factory`` work too)."""
    return sorted(_ZOO)


def resolve_model(name: str) -> ModelSpec:
    """Find where a model name comes from; ``ValueError`` listing the valid names if nowhere."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model must be a non-empty name, got {name!r}")
    if name in _ZOO:
        entry = _ZOO[name]
        return ModelSpec("zoo", name, entry.space, entry.normalization)
    if ":" in name:
        module, _, attr = name.partition(":")
        if not module or not attr:
            raise ValueError(f"model {name!r}: a user model is given as 'package.module:factory'")
        return ModelSpec("factory", name, "default")
    if name in _torchvision_names():
        family = "torchvision_resnet" if name.startswith(("resnet", "resnext", "wide_resnet")) else "default"
        return ModelSpec("torchvision", name, family, IMAGENET)
    raise ValueError(
        f"unknown model {name!r}; zoo models: {', '.join(list_models())}; "
        "or a torchvision classification model name, or 'package.module:factory'"
    )


def _factory(spec: ModelSpec) -> Callable[..., nn.Module]:
    if spec.source == "zoo":
        return _ZOO[spec.name].factory
    if spec.source == "torchvision":
        import torchvision.models

        return lambda num_classes=1000: torchvision.models.get_model(
            spec.name, weights=None, num_classes=num_classes
        )
    module_name, _, attr = spec.name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"model {spec.name!r}: cannot import module {module_name!r}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"model {spec.name!r}: module {module_name!r} has no callable {attr!r}")
    return factory  # type: ignore[no-any-return]


def build_model(
    name: str | ModelSpec,
    *,
    num_classes: int,
    weights: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """Build a model by name with ``num_classes`` outputs, and load ``weights`` (``weights_only=True``)."""
    spec = name if isinstance(name, ModelSpec) else resolve_model(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    factory = _factory(spec)
    if spec.source == "factory":  # the user's code: any failure is a bad --model
        try:
            model = factory(num_classes=num_classes)
        except Exception as exc:
            raise ValueError(
                f"model {spec.name!r}: factory(num_classes={num_classes}) failed: {shorten(first_line(exc), 160)} "
                "(a factory takes num_classes and returns an nn.Module)"
            ) from None
    else:
        model = factory(num_classes=num_classes)
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"model {spec.name!r}: the factory returned a {type(model).__name__}, not an nn.Module"
        )
    if weights is not None:
        load_weights(model, load_state_dict_file(weights), what=f"model {spec.name!r}")
    return model.eval()
