from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from fga_search import KEEP, build_model, decomposable_layers
from fga_search.engine._space import list_spaces, load_space


def test_shipped_spaces_load_from_the_installed_package() -> None:
    assert {"default", "resnet_cifar", "vgg_cifar", "torchvision_resnet"} <= set(list_spaces())
    for name in list_spaces():
        space = load_space(name)
        assert space.groups and 0 < space.rank.low <= space.rank.high <= 1


def test_resnet_space_on_resnet56() -> None:
    model = build_model("resnet56", num_classes=10)
    resolved = load_space("resnet_cifar").resolve(decomposable_layers(model))
    names = [layer.name for layer in resolved.layers]
    assert "conv1" not in names and len(names) == 54
    by_name = {layer.name: layer for layer in resolved.layers}
    assert by_name["layer1.0.conv1"].groups == (1, 2, 4, 8, 16)
    assert by_name["layer3.1.conv1"].groups == (1, 2, 4, 8, 16, 32)  # override
    assert by_name["layer3.0.conv1"].groups == (1, 2, 4, 8, 16, 32)  # 32 input channels
    dists = resolved.distributions()
    assert len(dists) == 108
    assert dists["g:layer2.0.conv2"].choices == (KEEP, 1, 2, 4, 8, 16)


def test_params_plan_round_trip() -> None:
    model = build_model("resnet20", num_classes=10)
    resolved = load_space("resnet_cifar").resolve(decomposable_layers(model))
    study = optuna.create_study(
        directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=1)
    )
    trial = study.ask()
    params = resolved.suggest(trial)
    plan = resolved.to_plan(params)
    assert set(plan) == {layer.name for layer in resolved.layers}
    again = resolved.to_plan(resolved.to_params(plan))
    assert again == plan
    assert sum(choice != KEEP for choice in plan.values()) > 0  # the checks below ran
    for layer in resolved.layers:
        choice = plan[layer.name]
        if choice != KEEP:
            g, r = choice
            assert g in layer.groups and 1 <= r <= layer.info.exact_rank(g)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "grups: [1, 2]\n",
            r"unknown key\(s\) \['grups'\]; valid keys: \['groups', 'overrides', 'pointwise', 'rank', 'skip'\]",
        ),
        ("groups: [0, 2]\n", r"group count 0 is impossible"),
        ("groups: [1.5]\n", r"group count 1.5 is impossible"),
        ("groups: []\n", r"must be a non-empty list of group counts"),
        ("rank: {low: 0.5, high: 0.1}\n", r"low \(0.5\) must not exceed high \(0.1\)"),
        ("rank: {low: 0, high: 0.1}\n", r"rank.low must be a fraction in \(0, 1\]"),
        ("rank: {lo: 0.1}\n", r"unknown key\(s\) \['lo'\]"),
        ("overrides: [{match: 'x', ranks: {}}]\n", r"overrides\[0\]: unknown key\(s\) \['ranks'\]"),
        ("groups: [1\n", r"is not valid YAML"),
    ],
)
def test_bad_space_files(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_space(write(tmp_path, text))


def test_group_count_that_fits_no_layer(tmp_path: Path) -> None:
    model = build_model("resnet20", num_classes=10)
    space = load_space(write(tmp_path, "groups: [1, 5]\n"))
    with pytest.raises(ValueError, match=r"group count\(s\) \[5\] divide no searched layer's input channels"):
        space.resolve(decomposable_layers(model))
    assert len(space.resolve(decomposable_layers(model), strict=False).layers) == 19


def test_unknown_space_name() -> None:
    with pytest.raises(ValueError, match="unknown space 'resnet'; shipped spaces: default, resnet_cifar"):
        load_space("resnet")
