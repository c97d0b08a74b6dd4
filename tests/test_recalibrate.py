from __future__ import annotations

import torch
from torch import nn

from fga_search.data._data import Split
from fga_search.models._loader import DeviceSplit, Normalization
from fga_search.train._recalibrate import recalibrate_bn


def test_recalibration_estimates_the_data_statistics() -> None:
    images = torch.randint(100, 200, (256, 3, 6, 6), dtype=torch.uint8)
    data = DeviceSplit(
        Split(images, torch.zeros(256, dtype=torch.int64)),
        device="cpu",
        normalization=Normalization((0.0,) * 3, (1.0,) * 3),
    )
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(), nn.Linear(144, 2)
    )
    model.eval()
    count = recalibrate_bn(model, data, images=256, batch_size=64)
    assert count == 1
    bn = model[1]
    with torch.no_grad():
        feats = model[0](data.take(torch.arange(256)))
    torch.testing.assert_close(bn.running_mean, feats.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert bn.momentum == 0.1  # restored
    assert not model.training and not model[2].training  # dropout stayed in eval mode
