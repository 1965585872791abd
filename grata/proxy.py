"""Label-free quality signals a site can compute and share: a Dice proxy and the alignment summary.

The proxy is what a coordinator watches instead of the Dice it cannot see:
  agreement     soft Dice x100 between the prediction and the mean over the weak views (the teacher);
  plausibility  share x100 of predicted cup pixels that lie inside the predicted disc (anatomy: the
                cup is part of the disc); 0 when no disc is predicted;
  dice_proxy    agreement * plausibility / 100.
"""
from __future__ import annotations

import math

import torch

COSINE_BINS = 10  # histogram of gradient cosines over [-1, 1]


def view_agreement(probs: torch.Tensor, teacher: torch.Tensor) -> float:
    """Soft Dice x100 between probabilities and the weak-view teacher, both [B, 2, H, W], mean over B and class."""
    inter = (probs * teacher).sum((2, 3))
    return (100 * (2 * inter + 1e-6) / (probs.sum((2, 3)) + teacher.sum((2, 3)) + 1e-6)).mean().item()


def plausibility(probs: torch.Tensor) -> float:
    """Share x100 of predicted cup inside the predicted disc, probs [B, 2, H, W] (disc, cup), mean over B."""
    disc, cup = probs[:, 0] > 0.5, probs[:, 1] > 0.5
    scores = []
    for d, c in zip(disc, cup):
        if not d.any():
            scores.append(0.0)
        elif not c.any():
            scores.append(100.0)  # no cup predicted: nothing implausible, agreement carries the signal
        else:
            scores.append(100.0 * float((c & d).sum()) / float(c.sum()))
    return sum(scores) / len(scores)


def dice_proxy(probs: torch.Tensor, teacher: torch.Tensor) -> dict[str, float]:
    agree, plaus = view_agreement(probs, teacher), plausibility(probs)
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


__all__ = ["COSINE_BINS", "alignment_summary", "dice_proxy", "plausibility", "view_agreement"]
