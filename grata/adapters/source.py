"""No adaptation: the source model as trained (eval-mode BN statistics by default)."""
from __future__ import annotations

import torch

from grata.adapters.base import Adapter


class SourceAdapter(Adapter):
    name = "source"
    default_bn = "source"
    trains = False

    @torch.no_grad()
    def step(self, images: torch.Tensor) -> torch.Tensor:
        return self.predict(images, observe=True)
