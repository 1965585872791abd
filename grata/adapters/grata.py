"""GraTa (Chen et al., AAAI 2025): gradient-alignment test-time adaptation.

One step on a batch X, over the BN affine parameters theta:
  g_aux = grad L_aux(theta; X)                 (default L_aux = entropy)
  theta' = theta - g_aux                        (step size exactly 1)
  g_pse = grad L_pse(theta'; X)                 (default L_pse = consistency)
  cos = <g_pse, g_aux> / (|g_pse| |g_aux| + 1e-12), jointly over all adapted parameters
  restore theta; one Adam step on g_pse with lr = beta * (cos + 1)^2 / 4
  predict X with the updated parameters.
fedgrata's additions, all off in the faithful configuration: `anchor` pulls the parameters back
towards the source by that fraction after each step; the base class's guard and per-image fallback
(grata.quality) read the label-free quality estimate, or, without one, the step's view agreement
(`proxy`).
"""
from __future__ import annotations

import torch

from grata.adapters.base import Adapter
from grata.augment import strong_style
from grata.losses import ENTROPY_FORMS, consistency, entropy
from grata.proxy import view_agreement

LOSSES = ("ent", "consis")


def cus(cos: float) -> float:
    """GraTa's dynamic learning-rate factor: -1 -> 0, 0 -> 0.25, 1 -> 1."""
    return (cos + 1.0) ** 2 / 4.0


class GraTaAdapter(Adapter):
    name = "grata"

    def __init__(self, model, lr: float = 1e-4, aux: str = "ent", pse: str = "consis", dynamic_lr: bool = True,
                 entropy_form: str = "reference", anchor: float = 0.0, **kw) -> None:
        for key, value in (("aux", aux), ("pse", pse)):
            if value not in LOSSES:
                raise ValueError(f"grata {key}={value!r}: choose one of {LOSSES}")
        if entropy_form not in ENTROPY_FORMS:
            raise ValueError(f"entropy_form={entropy_form!r}: choose one of {ENTROPY_FORMS}")
        if not 0 <= anchor <= 1:
            raise ValueError(f"anchor={anchor} must lie in [0, 1]")
        super().__init__(model, lr=lr, **kw)
        self.aux, self.pse, self.dynamic_lr = aux, pse, dynamic_lr
        self.entropy_form, self.anchor = entropy_form, anchor

    @property
    def first_pass_grad(self) -> bool:  # the entropy loss's pass builds a graph; the consistency's teacher does not
        return self.aux == "ent"

    def describe(self):
        return {**super().describe(), "aux": self.aux, "pse": self.pse, "dynamic_lr": self.dynamic_lr,
                "entropy_form": self.entropy_form, "anchor": self.anchor}

    # --- losses ----------------------------------------------------------------------------------
    def loss(self, kind: str, x: torch.Tensor, observe: bool = False) -> torch.Tensor:
        if kind == "ent":
            return entropy(self.forward(x, observe=observe), self.entropy_form)
        self._teacher = self.view_probs(x, observe=observe)  # the soft teacher
        return consistency(self.forward(strong_style(x, self.generator)), self._teacher)

    # --- the step --------------------------------------------------------------------------------
    def step(self, images: torch.Tensor) -> torch.Tensor:
        params, self._teacher = self.params, None
        loss_aux = self.loss(self.aux, images, observe=True)
        g_aux = torch.autograd.grad(loss_aux, params)
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            torch._foreach_sub_(params, g_aux)  # theta' = theta - g_aux, step size exactly 1
        loss_pse = self.loss(self.pse, images)
        g_pse = torch.autograd.grad(loss_pse, params)
        with torch.no_grad():
            torch._foreach_copy_(params, saved)  # restore theta exactly
            dot = sum((a * b).sum() for a, b in zip(g_pse, g_aux))
            n_pse = torch.sqrt(sum((g * g).sum() for g in g_pse))
            n_aux = torch.sqrt(sum((g * g).sum() for g in g_aux))
            cos = (dot / (n_pse * n_aux + 1e-12)).item()
        lr = self.lr * cus(cos) if self.dynamic_lr else self.lr
        for p, g in zip(params, g_pse):
            p.grad = g
        self.optimizer.param_groups[0]["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.anchor:
            with torch.no_grad():
                torch._foreach_lerp_(params, self._source_params, self.anchor)
        with torch.no_grad():
            logits = self.predict(images)
            ent = entropy(logits, self.entropy_form).item()
        self.last_step = {"loss_aux": loss_aux.item(), "loss_pse": loss_pse.item(), "cosine": cos, "lr": lr,
                          "grad_aux_norm": n_aux.item(), "grad_pse_norm": n_pse.item(), "entropy": ent}
        if "consis" in (self.aux, self.pse):
            self.last_step["loss_consis"] = (loss_pse if self.pse == "consis" else loss_aux).item()
        self.last_teacher = self._teacher
        if self._teacher is not None:  # free: the teacher of weak views was computed for the step
            self.last_step["proxy"] = view_agreement(torch.sigmoid(logits), self._teacher)
        return logits
