from __future__ import annotations

from collections import namedtuple

import pytest
import torch

from fga_search.models._loader import DeviceSplit
from fga_search.train._evaluate import evaluate, main_logits, predict_logits
from helpers import aux_head_cnn

Outputs = namedtuple("Outputs", ["logits", "aux_logits"])


@pytest.mark.parametrize(
    "wrap",
    [
        lambda t: t,
        lambda t: Outputs(t, -t),  # torchvision GoogLeNet / Inception in training mode
        lambda t: {"logits": t, "hidden": -t},
        lambda t: (t, -t),
        lambda t: [t],
    ],
)
def test_main_logits_of_structured_outputs(wrap) -> None:  # type: ignore[no-untyped-def]
    t = torch.randn(4, 10)
    assert main_logits(wrap(t)) is t


@pytest.mark.parametrize("bad", [None, 3.0, (), {"scores": torch.zeros(2)}, ("x", torch.zeros(2))])
def test_main_logits_refuses_what_holds_no_logits(bad: object) -> None:
    with pytest.raises(TypeError, match=f"the model returned a {type(bad).__name__}; expected a tensor"):
        main_logits(bad)


class DictOutput(torch.nn.Module):
    """A model that returns its logits under a key, in eval mode too."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.inner(x)}


def test_evaluate_models_with_structured_outputs() -> None:
    from fga_search.data._data import Split
    from fga_search.models._loader import Normalization

    model = aux_head_cnn(num_classes=3).eval()
    images = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    first = DeviceSplit(
        Split(images, torch.zeros(10, dtype=torch.int64)),
        device="cpu",
        normalization=Normalization((0.5,), (0.25,)),
    )
    labels = predict_logits(model, first, batch_size=4).argmax(1)
    labels[:3] = (labels[:3] + 1) % 3  # 3 of 10 wrong
    data = DeviceSplit(Split(images, labels), device="cpu", normalization=Normalization((0.5,), (0.25,)))
    assert evaluate(DictOutput(model), data, batch_size=4) == pytest.approx(0.7)
    assert evaluate(model, data, batch_size=4) == pytest.approx(0.7)
