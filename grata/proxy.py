"""Label-free quality signals a site can compute and share: a Dice proxy and the alignment summary.

The proxy is what a coordinator watches instead of the Dice it cannot see:
  agreement     Dice x100 between the binarised prediction and the binarised mean over the weak views
                (the teacher), per class; hard masks, because soft Dice is dominated by the many small
                background probabilities (it read ~40 where the true Dice was ~90);
  plausibility  share x100 of predicted cup pixels that lie inside the predicted disc (anatomy: the
                cup is part of the disc); 0 when the disc or the cup is missing (every optic disc has a
                cup), or when the cup covers more than MAX_CUP_TO_DISC of the disc's area;
  dice_proxy    agreement * plausibility / 100.
"""
from __future__ import annotations

import math

import torch

COSINE_BINS = 10  # histogram of gradient cosines over [-1, 1]
MAX_CUP_TO_DISC = 0.9  # area ratio; glaucomatous cups are large, but a cup filling the disc is a failure


def view_agreement(probs: torch.Tensor, teacher: torch.Tensor) -> float:
    """(The GraTa drift guard's signal, kept as measured in the library issue.) Soft Dice x100 between probabilities and the weak-view teacher, both [B, 2, H, W], mean over B and class."""
    inter = (probs * teacher).sum((2, 3))
    return (100 * (2 * inter + 1e-6) / (probs.sum((2, 3)) + teacher.sum((2, 3)) + 1e-6)).mean().item()


def mask_agreement(probs: torch.Tensor, teacher: torch.Tensor) -> float:
    """Dice x100 between binarised probs and teacher [B, 2, H, W], mean over B and class; 100 when both are empty."""
    a, b = probs > 0.5, teacher > 0.5
    inter = (a & b).sum((2, 3)).float()
    total = (a.sum((2, 3)) + b.sum((2, 3))).float()
    dice = torch.where(total > 0, 200 * inter / total.clamp_min(1), torch.full_like(total, 100.0))
    return dice.mean().item()


def plausibility(probs: torch.Tensor) -> float:
    """Anatomical plausibility x100 of probs [B, 2, H, W] (disc, cup), mean over B (see the module doc)."""
    disc, cup = probs[:, 0] > 0.5, probs[:, 1] > 0.5
    scores = []
    for d, c in zip(disc, cup):
        d_area, c_area = float(d.sum()), float(c.sum())
        if d_area == 0 or c_area == 0 or c_area > MAX_CUP_TO_DISC * d_area:
            scores.append(0.0)
        else:
            scores.append(100.0 * float((c & d).sum()) / c_area)
    return sum(scores) / len(scores)


def dice_proxy(probs: torch.Tensor, teacher: torch.Tensor) -> dict[str, float]:
    agree, plaus = mask_agreement(probs, teacher), plausibility(probs)
    return {"agreement": agree, "plausibility": plaus, "dice_proxy": agree * plaus / 100}


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


__all__ = ["COSINE_BINS", "alignment_summary", "dice_proxy", "mask_agreement", "plausibility", "view_agreement"]
