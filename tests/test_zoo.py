from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fga_search import WeightsError, build_model, list_models, register_model
from fga_search.models._loader import DeviceSplit
from fga_search.models._zoo import CIFAR10, resolve_model
from fga_search.train._evaluate import evaluate


def test_zoo_names() -> None:
    assert {"resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "vgg16_cifar", "digits_cnn"} <= set(
        list_models()
    )
    assert resolve_model("resnet56").space == "resnet_cifar"
    assert resolve_model("resnet50").source == "torchvision"
    assert resolve_model("resnet50").space == "torchvision_resnet"
    assert resolve_model("mobilenet_v2").space == "default"


@pytest.mark.parametrize(("depth", "params"), [(20, 269_722), (32, 464_154), (56, 853_018), (110, 1_727_962)])
def test_cifar_resnet_sizes(depth: int, params: int) -> None:
    model = build_model(f"resnet{depth}", num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == params


def test_shared_checkpoints_load_strictly(shared: Path) -> None:
    resnet = build_model("resnet56", num_classes=10, weights=shared / "models" / "resnet56_cifar10.pt")
    vgg = build_model("vgg16_cifar", num_classes=10, weights=shared / "models" / "vgg16_cifar10.pt")
    assert not resnet.training and not vgg.training
    assert vgg.classifier.weight.dtype == torch.float32  # stored as float16, loaded into float32
    state = torch.load(shared / "models" / "resnet56_cifar10.pt", weights_only=True)
    torch.testing.assert_close(resnet.state_dict()["layer2.3.conv1.weight"], state["layer2.3.conv1.weight"])


@pytest.mark.slow
def test_resnet56_accuracy_on_jpeg_test_split(resnet56, cifar) -> None:  # type: ignore[no-untyped-def]
    data = DeviceSplit(cifar.test, device="cpu", normalization=CIFAR10)
    acc = evaluate(resnet56, data, batch_size=500)
    print(f"ResNet-56 test accuracy on the JPEG test split: {acc:.4f}")
    assert len(data) == 10_000
    assert abs(acc - 0.8860) <= 0.001


def test_torchvision_and_factory_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tv = build_model("mobilenet_v2", num_classes=7)
    assert tv.classifier[-1].out_features == 7
    pkg = tmp_path / "usermodels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(
        textwrap.dedent(
            """
            from torch import nn
            def tiny(num_classes=10):
                return nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
            def not_a_model(num_classes=10):
                return 42
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model("usermodels.nets:tiny", num_classes=3)
    assert model[-1].out_features == 3
    weights = tmp_path / "tiny.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, weights)
    again = build_model("usermodels.nets:tiny", num_classes=3, weights=weights)
    torch.testing.assert_close(again[0].weight, model[0].weight)
    with pytest.raises(ValueError, match="returned a int, not an nn.Module"):
        build_model("usermodels.nets:not_a_model", num_classes=3)
    with pytest.raises(ValueError, match="has no callable 'missing'"):
        build_model("usermodels.nets:missing", num_classes=3)
    with pytest.raises(ValueError, match="cannot import module 'nope.nets'"):
        build_model("nope.nets:tiny", num_classes=3)
    sys.modules.pop("usermodels.nets", None)
    sys.modules.pop("usermodels", None)


def test_unknown_model_lists_names() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'resnet57'; zoo models: digits_cnn, resnet110"):
        build_model("resnet57", num_classes=10)


def test_registry_refuses_duplicates() -> None:
    with pytest.raises(ValueError, match=r"model 'resnet56' is already registered; registered models: \["):
        register_model("resnet56", lambda num_classes=10: torch.nn.Identity())


def test_checkpoint_model_mismatch_names_first_keys(shared: Path) -> None:
    with pytest.raises(
        WeightsError, match=r"weights do not fit model 'resnet20': .*unexpected keys: layer1.3.conv1.weight"
    ):
        build_model("resnet20", num_classes=10, weights=shared / "models" / "resnet56_cifar10.pt")
    with pytest.raises(
        WeightsError, match=r"shape mismatch: fc.weight \(checkpoint \(10, 64\) vs model \(100, 64\)\)"
    ):
        build_model("resnet56", num_classes=100, weights=shared / "models" / "resnet56_cifar10.pt")
    with pytest.raises(
        WeightsError, match=r"weights do not fit model 'vgg16_cifar': .*missing keys: features.0.weight"
    ):
        build_model("vgg16_cifar", num_classes=10, weights=shared / "models" / "resnet56_cifar10.pt")


def test_non_finite_and_corrupt_weights(tmp_path: Path) -> None:
    model = build_model("resnet20", num_classes=10)
    state = model.state_dict()
    state["layer2.1.conv2.weight"][0, 0, 0, 0] = float("inf")
    bad = tmp_path / "inf.pt"
    torch.save(state, bad)
    with pytest.raises(WeightsError, match=r"non-finite values \(NaN or inf\) in 'layer2.1.conv2.weight'"):
        build_model("resnet20", num_classes=10, weights=bad)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsError, match="cannot read weights file .*corrupt.pt"):
        build_model("resnet20", num_classes=10, weights=corrupt)
    with pytest.raises(WeightsError, match="weights file not found: .*missing.pt"):
        build_model("resnet20", num_classes=10, weights=tmp_path / "missing.pt")


class Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (print, ("pwned",))


def test_pickled_code_is_never_unpickled(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"conv1.weight": torch.zeros(1), "payload": Evil()}, path)
    with pytest.raises(WeightsError, match="cannot read weights file"):
        build_model("resnet20", num_classes=10, weights=path)
    assert "pwned" not in capsys.readouterr().out
