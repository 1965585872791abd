"""Losses over logits [B, 2, H, W] (sigmoid outputs: disc, cup). Pure functions, no state."""
from __future__ import annotations

import torch
import torch.nn.functional as F

ENTROPY_FORMS = ("reference", "binary")


def entropy(logits: torch.Tensor, form: str = "reference") -> torch.Tensor:
    """Mean pixel entropy of the sigmoid outputs, summed over the channels.

    form="reference": -sum_c p log(p + 1e-6), the form of the public GraTa code (only the
    foreground half of the binary entropy). form="binary": the full binary entropy
    -[p log p + (1-p) log(1-p)], computed stably from the logits.
    """
    if form == "reference":
        p = torch.sigmoid(logits)
        return -(p * torch.log(p + 1e-6)).sum(1).mean()
    if form == "binary":
        p = torch.sigmoid(logits)
        # H(p) = softplus(z) - p*z for p = sigmoid(z): exact and free of log(0)
        return (F.softplus(logits) - p * logits).sum(1).mean()
    raise ValueError(f"entropy form {form!r}: choose one of {ENTROPY_FORMS}")


def consistency(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """BCE between the strongly augmented view's logits and the soft teacher (no gradient)."""
    return F.binary_cross_entropy_with_logits(student_logits, teacher_probs.detach())


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice, per image and channel, averaged."""
    p = torch.sigmoid(logits)
    inter = (p * target).sum((2, 3))
    denom = p.sum((2, 3)) + target.sum((2, 3))
    return 1 - ((2 * inter + eps) / (denom + eps)).mean()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Supervised source-training loss: Dice + BCE."""
    return soft_dice_loss(logits, target) + F.binary_cross_entropy_with_logits(logits, target)
