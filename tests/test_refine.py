from __future__ import annotations

import pytest
import torch
from torch import nn

import fga_search.core._refine as refine_module
from fga_search import ModelProfile, decomposable_layers, decompose, refine, refinement_report
from fga_search.models._loader import DeviceSplit
from fga_search.models._zoo import CIFAR10
from fga_search.train._evaluate import evaluate
from fga_search.train._recalibrate import recalibrate_bn


def correlated(n: int, mixing: torch.Tensor) -> torch.Tensor:
    """Images whose 8 channels mix 2 latent ones plus a little noise: inputs SVD alone ignores."""
    latent = torch.randn(n, mixing.shape[1], 12, 12)
    return torch.einsum("cl,nlhw->nchw", mixing, latent) + 0.05 * torch.randn(n, mixing.shape[0], 12, 12)


def test_refine_recovers_a_layer_on_correlated_data() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(8, 32, 3, padding=1, bias=True), nn.ReLU(), nn.Conv2d(32, 16, 3, padding=1)
    )
    mixing = torch.randn(8, 2)
    calib = correlated(64, mixing)
    plan = {"0": (2, 6), "2": (4, 3)}
    svd_only = decompose(model, plan)
    refined = decompose(model, plan, calib)
    report = refinement_report(refined)
    assert set(report) == {"0", "2"}
    for fit in report.values():
        assert fit.after <= fit.before
        assert fit.samples > 0
    assert report["0"].after < report["0"].before * 0.8
    held = correlated(32, mixing)
    with torch.no_grad():
        ref = model(held)
        err_svd = float((svd_only(held) - ref).norm() / ref.norm())
        err_ref = float((refined(held) - ref).norm() / ref.norm())
    assert err_ref < 0.9 * err_svd


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_refine_does_not_overfit_a_layer_with_few_rows_per_weight(seed: int, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A 1x1 conv on 1x1 pixels (a squeeze-and-excitation layer) sees one row per image: 24
    calibration images for 33 weights per output. The least-squares fit interpolates those rows
    and doubles the error on other images; the ridge chosen on held-out rows keeps the SVD's."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(48, 48, 1, bias=True))
    plan = {"0": (4, 8)}
    calib, held = torch.randn(24, 48, 1, 1), torch.randn(256, 48, 1, 1)

    def held_error(m: nn.Module) -> float:
        with torch.no_grad():
            ref = model(held)
            return float((m(held) - ref).norm() / ref.norm())

    err_svd = held_error(decompose(model, plan))
    refined = decompose(model, plan, calib)
    assert refinement_report(refined)["0"].samples == 24
    assert held_error(refined) <= 1.02 * err_svd
    monkeypatch.setattr(refine_module, "_WELL_DETERMINED", 0)  # every fit as if well determined
    assert held_error(decompose(model, plan, calib)) > 1.5 * err_svd


def test_held_out_ridge_choice() -> None:
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(400, 20, generator=gen, dtype=torch.float64)
    w0 = torch.zeros(20, 3, dtype=torch.float64)
    w_true = torch.randn(20, 3, generator=gen, dtype=torch.float64)
    # a real linear relation and many rows: the weakest ridge fits best
    assert refine_module._held_out_ridge(z, z @ w_true, w0, 1e-6) == 1e-6
    # targets unrelated to the inputs: no fit predicts held-out rows better than w0 (zeros)
    noise = torch.randn(400, 3, generator=gen, dtype=torch.float64)
    assert refine_module._held_out_ridge(z, noise, w0, 1e-6) is None
    # fewer fitting rows (12) than weights (20): a relation as strong as the noise gets the
    # strongest ridge (1e6 times the weakest), a weak one no fit at all
    few = z[:15]
    assert refine_module._held_out_ridge(few, few @ w_true + noise[:15], w0, 1e-6) == pytest.approx(1.0)
    assert refine_module._held_out_ridge(few, few @ (0.1 * w_true) + noise[:15], w0, 1e-6) is None


@pytest.mark.parametrize("mode", ["asymmetric", "symmetric"])
def test_refine_keeps_an_exact_layer_exact(mode: str) -> None:
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2)).double()
    info = decomposable_layers(model)[0]
    new = decompose(model, {"0": (1, info.exact_rank(1))})
    fits = refine(new, model, torch.randn(8, 4, 6, 6, dtype=torch.float64), mode=mode, ridge=0.0)
    assert fits["0"].before < 1e-6 and fits["0"].after < 1e-6


def test_refine_bad_arguments() -> None:
    model = nn.Sequential(nn.Conv2d(4, 6, 3))
    new = decompose(model, {"0": (1, 2)})
    with pytest.raises(ValueError, match="mode must be one of"):
        refine(new, model, torch.randn(2, 4, 5, 5), mode="both")
    with pytest.raises(ValueError, match="calibration must be a non-empty"):
        refine(new, model, torch.randn(4, 5, 5))
    with pytest.raises(ValueError, match="calibration batch has non-finite values"):
        refine(new, model, torch.full((2, 4, 5, 5), float("nan")))
    with pytest.raises(ValueError, match="original model has no Conv2d named '0'"):
        refine(new, nn.Sequential(nn.Identity()), torch.randn(2, 4, 5, 5))


@pytest.mark.slow
def test_refinement_beats_svd_on_resnet56_at_a_fifth_of_the_flops(resnet56, cifar) -> None:  # type: ignore[no-untyped-def]
    profile = ModelProfile(resnet56, input_shape=(3, 32, 32))
    layers = [info for info in decomposable_layers(resnet56) if info.name != "conv1"]
    plan = {info.name: (4, max(1, round(0.12 * info.exact_rank(4)))) for info in layers}
    ratio = profile.ratio(plan)
    assert 0.17 <= ratio <= 0.22
    train = DeviceSplit(cifar.train, device="cpu", normalization=CIFAR10)
    val = DeviceSplit(cifar.val, device="cpu", normalization=CIFAR10)
    gen = torch.Generator().manual_seed(0)
    calib = next(train.batches(256, shuffle=True, generator=gen)).x
    held = next(val.batches(500, shuffle=True, generator=torch.Generator().manual_seed(1)))
    svd = decompose(resnet56, plan)
    refined = decompose(resnet56, plan, calib)
    with torch.no_grad():
        ref = resnet56(held.x)
        err_svd = float((svd(held.x) - ref).norm() / ref.norm())
        err_refined = float((refined(held.x) - ref).norm() / ref.norm())
    acc_svd = evaluate(svd, val, limit=2000)
    acc_refined = evaluate(refined, val, limit=2000)
    recalibrate_bn(svd, train, images=1024)
    recalibrate_bn(refined, train, images=1024)
    acc_svd_bn = evaluate(svd, val, limit=2000)
    acc_refined_bn = evaluate(refined, val, limit=2000)
    fits = refinement_report(refined)
    print(
        f"\nResNet-56, uniform g=4 plan at FLOPs ratio {ratio:.3f}, 256 calibration images, 2000 val images:\n"
        f"  logits relative error on a held-out batch: SVD {err_svd:.3f}  refined {err_refined:.3f}\n"
        f"  accuracy before fine-tuning:               SVD {acc_svd:.3f}  refined {acc_refined:.3f}\n"
        f"  after BN recalibration (1024 images):      SVD {acc_svd_bn:.3f}  refined {acc_refined_bn:.3f}\n"
        f"  mean per-layer error before/after refinement: "
        f"{sum(f.before for f in fits.values()) / len(fits):.3f} / {sum(f.after for f in fits.values()) / len(fits):.3f}"
    )
    assert len(fits) == len(plan)
    assert err_refined < err_svd
    assert acc_refined > acc_svd
    assert acc_refined_bn > acc_svd_bn
