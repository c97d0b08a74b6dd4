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
            r"unknown key\(s\) \['grups'\]; valid keys: \['groups', 'overrides', 'pointwise', 'rank', 'rank_multiple', 'skip'\]",
        ),
        ("groups: [0, 2]\n", r"group count 0 is impossible"),
        ("groups: [1.5]\n", r"group count 1.5 is impossible"),
        ("groups: []\n", r"must be a non-empty list of group counts"),
        ("rank: {low: 0.5, high: 0.1}\n", r"low \(0.5\) must not exceed high \(0.1\)"),
        ("rank: {low: 0, high: 0.1}\n", r"rank.low must be a fraction in \(0, 1\]"),
        ("rank: {lo: 0.1}\n", r"unknown key\(s\) \['lo'\]"),
        ("overrides: [{match: 'x', ranks: {}}]\n", r"overrides\[0\]: unknown key\(s\) \['ranks'\]"),
        ("groups: [1\n", r"is not valid YAML"),
        ("rank_multiple: 0\n", r"rank_multiple must be an integer from 1 to 256, got 0"),
        ("rank_multiple: 8.5\n", r"rank_multiple must be an integer from 1 to 256, got 8.5"),
        (
            "overrides: [{match: 'x', rank_multiple: true}]\n",
            r"overrides\[0\].rank_multiple must be an integer",
        ),
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


def test_rank_multiple_puts_every_plan_on_its_multiples(tmp_path: Path) -> None:
    """``rank_multiple`` rounds every rank the space yields, the cheapest included, to a multiple
    (where the exact rank has one), per layer by override; the repair steps down by multiples."""
    from fga_search.core._flops import ModelProfile
    from fga_search.core._spectra import SpectralTable
    from fga_search.engine._cost import CostModel
    from fga_search.engine._repair import repair

    text = "groups: [1, 2, 4]\nrank_multiple: 8\noverrides: [{match: 'layer3.*', rank_multiple: 16}]\n"
    model = build_model("resnet20", num_classes=10)
    resolved = load_space(write(tmp_path, text)).resolve(decomposable_layers(model))
    by_name = {layer.name: layer for layer in resolved.layers}
    assert by_name["layer1.0.conv1"].rank_multiple == 8 and by_name["layer3.0.conv1"].rank_multiple == 16
    layer = by_name["layer1.0.conv1"]  # 16 channels: exact rank min(16, 16 / g * 9) = 16
    assert [layer.round_rank(1, r) for r in (1, 5, 11, 12, 13, 16)] == [8, 8, 8, 16, 16, 16]
    import dataclasses

    assert dataclasses.replace(layer, rank_multiple=32).round_rank(1, 3) == 3  # no multiple of 32 fits
    assert layer.lowest_ranks()[1] == 8 and layer.lower_rank(1, 16) == 8 and layer.lower_rank(1, 8) is None
    study = optuna.create_study(
        directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=3)
    )
    ranks = []
    for _ in range(20):
        plan = resolved.to_plan(resolved.suggest(study.ask()))
        for name, choice in plan.items():
            if choice != KEEP:
                g, r = choice
                m, top = by_name[name].rank_multiple, by_name[name].info.exact_rank(g)
                assert r % m == 0 or top < m, (name, choice)
                ranks.append(r)
    assert ranks  # the checks ran
    profile = ModelProfile(model, input_shape=(3, 32, 32))
    cost = CostModel(profile, metric="flops")
    plan = resolved.round_plan({layer.name: (1, layer.info.exact_rank(1)) for layer in resolved.layers})
    # (rank 8 at least on 16-channel layers: a narrow net's floor rises, here to 0.38 of the FLOPs)
    fixed = repair(plan, cost=cost, spectra=SpectralTable(model), space=resolved, budget=0.5)
    assert cost.ratio(fixed) <= 0.5 and fixed != plan
    for name, choice in fixed.items():
        if choice != KEEP:
            assert choice[1] % by_name[name].rank_multiple == 0, (name, choice)
