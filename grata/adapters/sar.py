"""SAR (Niu et al., ICLR 2023): sharpness-aware entropy minimisation on reliable samples only.

A batch whose mean pixel entropy exceeds `margin` (a fraction of the maximum) is not used to
adapt. Otherwise: g = grad L_ent(theta); e = rho * g / |g|; step on grad L_ent(theta + e).
The original's model-recovery rule is left out: fedgrata's coordinator owns resets.
"""
from __future__ import annotations

import math

import torch

from grata.adapters.base import Adapter
from grata.losses import entropy


class SARAdapter(Adapter):
    name = "sar"

    def __init__(self, model, lr: float = 1e-4, rho: float = 0.05, margin: float = 0.4, **kw) -> None:
        super().__init__(model, lr=lr, **kw)
        self.rho, self.margin = rho, margin
        self.max_entropy = 2 * math.log(2)  # full binary entropy, two channels

    def describe(self):
        return {**super().describe(), "rho": self.rho, "margin": self.margin}

    def step(self, images: torch.Tensor) -> torch.Tensor:
        params = self.params
        loss = entropy(self.forward(images, observe=True), "binary")
        reliable = loss.item() < self.margin * self.max_entropy
        if reliable:
            g = torch.autograd.grad(loss, params)
            with torch.no_grad():
                norm = torch.sqrt(sum((x * x).sum() for x in g)) + 1e-12
                e = [self.rho * x / norm for x in g]
                torch._foreach_add_(params, e)
            g_sharp = torch.autograd.grad(entropy(self.forward(images), "binary"), params)
            with torch.no_grad():
                torch._foreach_sub_(params, e)
            for p, gs in zip(params, g_sharp):
                p.grad = gs
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            logits = self.predict(images)
        self.last_step = {"loss": loss.item(), "lr": self.lr if reliable else 0.0, "reliable": float(reliable)}
        return logits
