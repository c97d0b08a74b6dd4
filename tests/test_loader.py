from __future__ import annotations

import pytest
import torch

from fga_search.data._data import Split
from fga_search.models._loader import Augment, DeviceSplit, Normalization


def split(n: int = 10) -> Split:
    images = torch.arange(n * 3 * 4 * 4, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(n, 3, 4, 4)
    return Split(images, torch.arange(n))


def test_normalization() -> None:
    norm = Normalization(mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    x = norm.apply(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8))
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([2.0, 1.0, 0.5]))
    with pytest.raises(ValueError, match="std must be positive"):
        Normalization(mean=(0.0,), std=(0.0,))
    with pytest.raises(ValueError, match="images have 3 channels but the normalization has 1"):
        Normalization(mean=(0.0,), std=(1.0,)).apply(torch.zeros(1, 3, 2, 2, dtype=torch.uint8))


def test_batches_cover_the_split_once() -> None:
    data = DeviceSplit(split(10), device="cpu", normalization=Normalization((0.0,) * 3, (1.0,) * 3))
    seen = torch.cat(
        [b.index for b in data.batches(3, shuffle=True, generator=torch.Generator().manual_seed(1))]
    )
    assert sorted(seen.tolist()) == list(range(10))
    assert [len(b.y) for b in data.batches(3, drop_last=True)] == [3, 3, 3]
    assert [len(b.y) for b in data.batches(4, limit=6)] == [4, 2]
    first = next(data.batches(10))
    torch.testing.assert_close(first.x, split(10).images.float() / 255)


def test_augmentation_flips_and_crops_within_padding() -> None:
    data = DeviceSplit(split(64), device="cpu", normalization=Normalization((0.0,) * 3, (1.0,) * 3))
    plain = next(data.batches(64)).x
    flipped = next(data.batches(64, augment=Augment(flip=True), generator=torch.Generator().manual_seed(0)))
    assert 10 < int(flipped.flipped.sum()) < 54
    torch.testing.assert_close(flipped.x[flipped.flipped], plain[flipped.index[flipped.flipped]].flip(3))
    torch.testing.assert_close(flipped.x[~flipped.flipped], plain[flipped.index[~flipped.flipped]])
    cropped = next(
        data.batches(64, augment=Augment(crop_pad=1), generator=torch.Generator().manual_seed(0))
    ).x
    assert cropped.shape == plain.shape
    assert not torch.equal(cropped, plain)
    # a crop with padding 1 keeps the centre 2x2 pixels of a 4x4 image inside the 3x3 window
    assert (cropped[:, :, 1:3, 1:3] - plain[:, :, 1:3, 1:3]).abs().sum() > 0
    assert cropped.min() >= plain.min() and cropped.max() <= plain.max()
