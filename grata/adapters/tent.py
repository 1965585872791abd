"""TENT (Wang et al., ICLR 2021): minimise prediction entropy over the BN affine parameters."""
from __future__ import annotations

import torch

from grata.adapters.base import Adapter
from grata.losses import entropy


class TentAdapter(Adapter):
    name = "tent"

    def __init__(self, model, lr: float = 1e-4, entropy_form: str = "reference", **kw) -> None:
        super().__init__(model, lr=lr, **kw)
        self.entropy_form = entropy_form

    def step(self, images: torch.Tensor) -> torch.Tensor:
        loss = entropy(self.forward(images, observe=True), self.entropy_form)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            logits = self.predict(images)
        self.last_step = {"loss": loss.item(), "lr": self.lr}
        return logits

    def describe(self):
        return {**super().describe(), "entropy_form": self.entropy_form}
