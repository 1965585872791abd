"""Segmentation metrics, per image and per structure, as GraTa reports them.

Inputs are binary masks [B, 2, H, W] (bool or {0,1}); channel 0 = disc, channel 1 = cup.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import distance_transform_edt

STRUCTURES = ("disc", "cup")


def binarize(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Logits [B, C, H, W] -> bool masks, sigmoid thresholded at `threshold`."""
    return torch.sigmoid(logits) > threshold


def dice(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice x100 per image and channel: (2|P∩G| + 1e-6) / (|P| + |G| + 1e-6) -> [B, C]."""
    p, g = pred.bool().flatten(2), target.bool().flatten(2)
    inter = (p & g).sum(-1).double()
    return (100 * (2 * inter + 1e-6) / (p.sum(-1) + g.sum(-1) + 1e-6)).float()


def boundary(mask: torch.Tensor) -> torch.Tensor:
    """Pixels of a bool mask [..., H, W] with a 4-neighbour outside the mask."""
    m = mask.float()[None, None] if mask.ndim == 2 else mask.float().reshape(-1, 1, *mask.shape[-2:])
    eroded = -F.max_pool2d(-F.pad(m, (1, 1, 1, 1), value=0.0), 3, 1)  # 3x3 min filter
    return (mask.bool() & ~(eroded.reshape(mask.shape) > 0.5))


def average_surface_distance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Symmetric average surface distance in pixels per image and channel -> [B, C].

    Mean of the distances from each boundary pixel of one mask to the nearest boundary pixel of the
    other, over both directions. NaN where either mask is empty (undefined). The nearest-boundary
    distances come from a Euclidean distance transform of the other boundary (linear in the image
    size, where all pairs of boundary pixels were quadratic in the boundary length).
    """
    out = torch.full(pred.shape[:2], float("nan"))
    for b in range(pred.shape[0]):
        for c in range(pred.shape[1]):
            bp = boundary(pred[b, c].bool()).numpy()
            bg = boundary(target[b, c].bool()).numpy()
            if not bp.any() or not bg.any():
                continue
            # only the box around both boundaries matters (every nearest pixel lies in it): a disc is a
            # small part of the image, so this keeps the transform cheap
            rows, cols = np.nonzero(bp | bg)
            box = np.s_[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
            bp, bg = bp[box], bg[box]
            to_g = distance_transform_edt(~bg)[bp]  # each predicted boundary pixel -> nearest true one
            to_p = distance_transform_edt(~bp)[bg]
            out[b, c] = float((to_g.sum() + to_p.sum()) / (len(to_g) + len(to_p)))
    return out


def score(logits: torch.Tensor, target: torch.Tensor, with_asd: bool = True) -> dict[str, np.ndarray]:
    """Per-image scores: dice_disc, dice_cup, dice_mean (and asd_disc, asd_cup) as [B] arrays."""
    pred = binarize(logits)
    d = dice(pred, target)
    out = {"dice_disc": d[:, 0].numpy(), "dice_cup": d[:, 1].numpy(), "dice_mean": d.mean(1).numpy()}
    if with_asd:
        a = average_surface_distance(pred, target)
        out["asd_disc"], out["asd_cup"] = a[:, 0].numpy(), a[:, 1].numpy()
    return out
