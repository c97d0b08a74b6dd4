"""Data-driven refinement: refit each FGA layer's 1x1 conv (and bias) by least squares.

For an FGA layer, let Z be the grouped conv's output and Y the original conv's output on the same
images. The 1x1 conv M (and bias b) is refitted in closed form:

    M = argmin ||M Z + b - Y||^2 + lam ||M - M_svd||^2,

a ridge regression towards the SVD solution, solved in float64 per conv group. In the
*asymmetric* mode (the default) Z comes from the compressed network, whose earlier layers were
already refined in the same pass, and Y from the original network; in the *symmetric* mode both
come from the original network. Both modes need one forward pass of each network over the
calibration set, and the statistics use a random subset of output positions per layer.

``lam`` is ``ridge`` times the mean diagonal of Z^T Z. A layer with fewer than 10 sampled positions
per fitted weight (few calibration images, small spatial sizes such as the 2x2 layers of a CIFAR
VGG or the 1x1 squeeze-and-excitation convs) would interpolate its rows; there ``lam`` is chosen,
among 1 to 1e6 times that, on held-out positions, and the SVD solution is kept when no fit
predicts them better.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ._batchnorm import start_bn_recalibration
from ._fga import FGAConv2d

__all__ = ["LayerFit", "as_batch", "refine", "refinement_report"]

REFINE_MODES = ("asymmetric", "symmetric")
# A layer's stored targets stay under this many elements (64 MB in float32).
_TARGET_ELEMENTS = 16 * 2**20
# Gram matrices below this many multiply-adds are formed in float64, the rest in float32.
_FLOAT64_GRAM_MACS = 2 * 10**8
# With fewer rows than this many per fitted weight, the ridge strength is chosen on held-out rows.
_WELL_DETERMINED = 10


@dataclass(frozen=True)
class LayerFit:
    """Relative output error ||out - target|| / ||target|| of one layer before and after refinement."""

    before: float
    after: float
    samples: int


def as_batch(calibration: torch.Tensor | Iterable[object]) -> torch.Tensor:
    """Concatenate a calibration tensor, or an iterable of tensors or (input, label) pairs, into one batch."""
    if isinstance(calibration, torch.Tensor):
        batch = calibration
    else:
        parts: list[torch.Tensor] = []
        for item in calibration:
            x = item[0] if isinstance(item, (tuple, list)) else item
            if not isinstance(x, torch.Tensor):
                raise ValueError(
                    f"calibration items must be tensors or (input, label) pairs, got {type(x).__name__}"
                )
            parts.append(x)
        if not parts:
            raise ValueError("calibration is empty")
        batch = torch.cat(parts)
    if batch.ndim != 4 or batch.shape[0] == 0:
        raise ValueError(
            f"calibration must be a non-empty (N, C, H, W) batch, got shape {tuple(batch.shape)}"
        )
    if not torch.isfinite(batch).all():
        raise ValueError("calibration batch has non-finite values")
    return batch


def _sample_positions(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows of a (N, C, H, W) tensor at flat positions ``idx`` over (N, H, W): a (K, C) tensor in
    float32 or wider."""
    _, _, h, w = t.shape
    b = idx // (h * w)
    rest = idx % (h * w)
    return t[b, :, rest // w, rest % w].to(torch.promote_types(t.dtype, torch.float32))


def _gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.shape[0] * a.shape[1] * b.shape[1] <= _FLOAT64_GRAM_MACS:
        return a.double().T @ b.double()
    return (a.T @ b).double()


class _Fitter:
    """Closed-form refit of one FGA layer's pointwise conv from sampled (Z, Y) rows."""

    def __init__(self, layer: FGAConv2d, ridge: float) -> None:
        self.layer = layer
        self.ridge = ridge

    @torch.no_grad()
    def fit(self, z: torch.Tensor, y: torch.Tensor) -> LayerFit:
        layer = self.layer
        big_g = layer.base_groups
        width = layer.groups * layer.rank
        n_per = layer.out_channels // big_g
        weight = layer.pointwise.weight
        bias = layer.pointwise.bias
        new_w = torch.empty_like(weight)
        new_b = None if bias is None else torch.empty_like(bias)
        err_before = err_after = energy = 0.0
        for j in range(big_g):
            zj = z[:, j * width : (j + 1) * width]
            yj = y[:, j * n_per : (j + 1) * n_per]
            w0 = weight[j * n_per : (j + 1) * n_per, :, 0, 0].double().T  # (width, n/G)
            if bias is not None:
                zj = torch.cat([zj, torch.ones_like(zj[:, :1])], dim=1)
                w0 = torch.cat([w0, bias[j * n_per : (j + 1) * n_per].double().unsqueeze(0)], dim=0)
            a = _gram(zj, zj)
            b = _gram(zj, yj)
            yy = float(_gram(yj, yj).trace())
            weakest = self.ridge * float(a.trace()) / a.shape[0] + 1e-12
            few_rows = zj.shape[0] < _WELL_DETERMINED * a.shape[0]
            lam = _held_out_ridge(zj, yj, w0, weakest) if few_rows else weakest
            if lam is None:
                w = w0  # no ridge strength did better than the SVD solution on held-out rows
            else:
                eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
                w = torch.linalg.solve(a + lam * eye, b + lam * w0)

            def sq_err(m: torch.Tensor, a: torch.Tensor = a, b: torch.Tensor = b, yy: float = yy) -> float:
                return float((m * (a @ m)).sum() - 2 * (m * b).sum()) + yy

            e0, e1 = sq_err(w0), sq_err(w)
            if not math.isfinite(e1) or e1 > e0:
                w, e1 = w0, e0  # never make a layer worse on its own calibration data
            err_before += max(e0, 0.0)
            err_after += max(e1, 0.0)
            energy += yy
            if bias is not None:
                assert new_b is not None
                new_b[j * n_per : (j + 1) * n_per] = w[-1].to(new_b.dtype)
                w = w[:-1]
            new_w[j * n_per : (j + 1) * n_per, :, 0, 0] = w.T.to(new_w.dtype)
        weight.copy_(new_w)
        if bias is not None:
            assert new_b is not None
            bias.copy_(new_b)
        scale = max(energy, 1e-30)
        return LayerFit(
            before=math.sqrt(err_before / scale), after=math.sqrt(err_after / scale), samples=z.shape[0]
        )


def _held_out_ridge(z: torch.Tensor, y: torch.Tensor, w0: torch.Tensor, lam: float) -> float | None:
    """The ridge strength, among ``lam`` times 1, 10, ..., 1e6, whose fit on four fifths of the rows
    best predicts the other fifth; None when none predicts it better than ``w0`` (the SVD solution).

    With few rows per fitted weight (a layer at a small spatial size, or few calibration images)
    the least-squares fit interpolates its rows and can be far worse than the SVD solution on other
    images; the held-out rows (every fifth: the rows are random positions already) catch that.
    The fits for all strengths come from one SVD of the fitting rows: with r = y - z w0 and
    z = U S V^T, the fit is w0 + V diag(s / (s^2 + lam)) U^T r."""
    if z.shape[0] < 2:
        return None  # no row to fit on, or none to hold out
    hold = torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
    hold[::5] = True
    zf, zh = z[~hold].double(), z[hold].double()
    rf = y[~hold].double() - zf @ w0
    rh = y[hold].double() - zh @ w0
    u, s, vh = torch.linalg.svd(zf, full_matrices=False)
    proj = u.T @ rf
    zv = zh @ vh.T
    best, best_err = None, float((rh * rh).sum())
    for k in range(7):
        candidate = lam * 10.0**k
        pred = zv @ ((s / (s * s + candidate)).unsqueeze(1) * proj)
        err = float(((rh - pred) ** 2).sum())
        if math.isfinite(err) and err < best_err:
            best, best_err = candidate, err
    return best


def _first_call_only(fn):  # type: ignore[no-untyped-def]
    """Wrap a forward hook so that it acts on a module's first call in a pass only."""
    seen = {"calls": 0}

    def hook(module, inputs, output):  # type: ignore[no-untyped-def]
        seen["calls"] += 1
        if seen["calls"] == 1:
            fn(module, inputs, output)

    return hook


@torch.no_grad()
def refine(
    compressed: nn.Module,
    original: nn.Module,
    calibration: torch.Tensor | Iterable[object],
    *,
    mode: str = "asymmetric",
    max_samples: int = 32768,
    ridge: float = 1e-3,
    seed: int = 0,
    recalibrate_bn: bool = True,
) -> dict[str, LayerFit]:
    """Refit every FGA layer of ``compressed`` (in place) to reproduce ``original``'s conv outputs.

    ``compressed`` must come from ``original`` by :func:`fga_search.decompose`, so that its FGA
    layers have the names of the convs they replace. Returns the per-layer relative output
    error before and after refinement; it is also stored on each layer (``layer.fit``).

    With ``recalibrate_bn`` (asymmetric mode only), the compressed network's batch-norm layers
    normalise with the calibration batch's statistics during the pass and keep them as their
    running statistics, so each layer is refitted on the inputs it will see after BN recalibration.
    """
    if mode not in REFINE_MODES:
        raise ValueError(f"mode must be one of {list(REFINE_MODES)}, got {mode!r}")
    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    if ridge < 0 or not math.isfinite(ridge):
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge}")
    fga_layers = {name: m for name, m in compressed.named_modules() if isinstance(m, FGAConv2d)}
    if not fga_layers:
        return {}
    originals = dict(original.named_modules())
    for name in fga_layers:
        if not isinstance(originals.get(name), nn.Conv2d):
            raise ValueError(f"original model has no Conv2d named {name!r} to refine layer {name!r} against")
    param = next(compressed.parameters())
    batch = as_batch(calibration).to(device=param.device, dtype=param.dtype)
    gen = torch.Generator().manual_seed(seed)
    targets: dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]] = {}
    fits: dict[str, LayerFit] = {}
    fitters = {name: _Fitter(layer, ridge) for name, layer in fga_layers.items()}

    def positions(name: str, shape: torch.Size, channels: int) -> torch.Tensor:
        total = shape[0] * shape[2] * shape[3]
        k = max(1, min(max_samples, total, _TARGET_ELEMENTS // max(channels, 1)))
        return torch.randperm(total, generator=gen)[:k].to(batch.device)

    def original_hook(name: str):  # type: ignore[no-untyped-def]
        def fn(module, inputs, output):  # type: ignore[no-untyped-def]
            idx = positions(name, output.shape, output.shape[1])
            y = _sample_positions(output, idx)
            if mode == "symmetric":
                z = _sample_positions(fga_layers[name].grouped(inputs[0]), idx)
                fits[name] = fitters[name].fit(z, y)
            else:
                targets[name] = (idx, y, tuple(output.shape))

        return _first_call_only(fn)

    def compressed_hook(name: str):  # type: ignore[no-untyped-def]
        def fn(module, inputs, output):  # type: ignore[no-untyped-def]
            if name not in targets:
                return  # not reached by the original network's forward pass
            idx, y, shape = targets.pop(name)
            out_shape = (output.shape[0], fga_layers[name].out_channels, *output.shape[2:])
            if out_shape != shape:
                raise RuntimeError(f"layer {name!r} sees output shape {out_shape} but the original {shape}")
            fits[name] = fitters[name].fit(_sample_positions(output, idx), y)

        return _first_call_only(fn)

    was_training = (compressed.training, original.training)
    compressed.eval()
    original.eval()
    handles = [originals[name].register_forward_hook(original_hook(name)) for name in fga_layers]
    try:
        original(batch)
    finally:
        for h in handles:
            h.remove()
    if mode == "asymmetric":
        saved = start_bn_recalibration(compressed) if recalibrate_bn else []
        handles = [
            layer.grouped.register_forward_hook(compressed_hook(name)) for name, layer in fga_layers.items()
        ]
        try:
            compressed(batch)
        finally:
            for h in handles:
                h.remove()
            for module, momentum in saved:
                module.momentum = momentum  # type: ignore[assignment]
    compressed.train(was_training[0])
    original.train(was_training[1])
    for name, fit in fits.items():
        fga_layers[name].fit = fit
    return fits


def refinement_report(model: nn.Module) -> dict[str, LayerFit]:
    """The refinement fit stored on each refined FGA layer of ``model``."""
    return {
        name: m.fit
        for name, m in model.named_modules()
        if isinstance(m, FGAConv2d) and isinstance(m.fit, LayerFit)
    }
