import os
from pathlib import Path

import pytest
import torch
from torch import nn

torch.set_num_threads(min(2, os.cpu_count() or 1))

FUNDUS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fundus"


class TinyNet(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN -> 1x1 conv: enough to exercise every adapter quickly."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                  nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 2, 1))

    def forward(self, x):
        return self.body(x)


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    m = TinyNet()
    with torch.no_grad():  # non-trivial source statistics and affine parameters
        for layer in m.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.running_mean.uniform_(-0.2, 0.2)
                layer.running_var.uniform_(0.5, 1.5)
                layer.weight.uniform_(0.5, 1.5)
                layer.bias.uniform_(-0.2, 0.2)
    return m.eval()


@pytest.fixture
def image():
    return torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def fundus_root() -> Path:
    if not FUNDUS.is_dir():
        pytest.skip("../shared/data/fundus is not present")
    return FUNDUS
