from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torchvision

from fga_search.models._checkpoint import cpu_state_dict, load_state_dict_file, load_weights


def mnasnet() -> torch.nn.Module:
    # MNASNet's loader refuses a state_dict without its module versions (_metadata)
    return torchvision.models.mnasnet0_5(num_classes=3)


def test_cpu_state_dict_keeps_module_versions_through_a_weights_only_round_trip(tmp_path: Path) -> None:
    model = mnasnet()
    state = cpu_state_dict(model, clone=True)
    assert list(state) == list(model.state_dict())
    assert state._metadata[""]["version"] == 2  # type: ignore[attr-defined]
    assert all(not t.requires_grad and t.device.type == "cpu" for t in state.values())
    path = tmp_path / "model.pt"
    torch.save(state, path)
    again = mnasnet()
    again.load_state_dict(torch.load(path, weights_only=True))
    torch.testing.assert_close(again.layers[0].weight, model.layers[0].weight)
    # what checkpoints were before: a plain dict, which MNASNet refuses ("shluld" in torchvision < 0.20)
    with pytest.raises(ValueError, match=r"version sh(ou|lu)ld be set to 1 or 2 instead of None"):
        mnasnet().load_state_dict({k: v for k, v in state.items()})


def test_weights_files_keep_versions_and_plain_dicts_take_the_models(tmp_path: Path) -> None:
    model = mnasnet()
    state = model.state_dict()
    wrapped = OrderedDict((f"module.{k}", v) for k, v in state.items())
    # as nn.DataParallel(model).state_dict() saves it: "" is the wrapper, "module" the model
    wrapped._metadata = OrderedDict(  # type: ignore[attr-defined]
        [("", {"version": 1})] + [(f"module.{k}" if k else "module", v) for k, v in state._metadata.items()]  # type: ignore[attr-defined]
    )
    torch.save(wrapped, tmp_path / "dp.pt")
    loaded = load_state_dict_file(tmp_path / "dp.pt")
    assert list(loaded) == list(state)
    assert loaded._metadata == state._metadata  # type: ignore[attr-defined]
    load_weights(mnasnet(), loaded)
    torch.save({k: v for k, v in state.items()}, tmp_path / "plain.pt")  # saved without versions
    plain = load_state_dict_file(tmp_path / "plain.pt")
    assert getattr(plain, "_metadata", None) is None
    again = load_weights(mnasnet(), plain)
    torch.testing.assert_close(again.classifier[1].weight, model.classifier[1].weight)
