"""What a GraTa step tells about itself: the view agreement of its prediction and the alignment summary.

The site's label-free quality estimate (what the coordinator tracks as `dice_proxy`) lives in
grata/quality.py; these are the step's own diagnostics.
"""
from __future__ import annotations

import math

import torch

COSINE_BINS = 10  # histogram of gradient cosines over [-1, 1]


def view_agreement(probs: torch.Tensor, teacher: torch.Tensor) -> float:
    """The guard's signal where no quality model exists. Soft Dice x100 between probabilities and the weak-view teacher, both [B, 2, H, W], mean over B and class."""
    inter = (probs * teacher).sum((2, 3))
    return (100 * (2 * inter + 1e-6) / (probs.sum((2, 3)) + teacher.sum((2, 3)) + 1e-6)).mean().item()


def alignment_summary(steps: list[dict[str, float]]) -> dict[str, float | list[float]]:
    """Summarise a round of GraTa steps (each adapter.last_step) into what a site shares.

    Keys present only when the steps carry them: align_cos_mean, align_cos_std, align_cos_hist
    (COSINE_BINS shares summing to 1), align_neg_share, lr_mean, entropy, consistency.
    """
    out: dict[str, float | list[float]] = {}
    cos = [s["cosine"] for s in steps if "cosine" in s]
    if cos:
        mean = sum(cos) / len(cos)
        out["align_cos_mean"] = mean
        out["align_cos_std"] = math.sqrt(sum((c - mean) ** 2 for c in cos) / len(cos))
        hist = torch.histc(torch.tensor(cos, dtype=torch.float64), bins=COSINE_BINS, min=-1.0, max=1.0)
        out["align_cos_hist"] = (hist / len(cos)).tolist()
        out["align_neg_share"] = sum(c < 0 for c in cos) / len(cos)
    for key, name in (("lr", "lr_mean"), ("entropy", "entropy"), ("loss_consis", "consistency")):
        values = [s[key] for s in steps if key in s]
        if values:
            out[name] = sum(values) / len(values)
    return out


__all__ = ["COSINE_BINS", "alignment_summary", "view_agreement"]
