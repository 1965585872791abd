"""The distance-transform surface distance gives the all-pairs (cdist) values on the test masks."""
from __future__ import annotations

import torch

from grata.metrics import average_surface_distance, boundary
from grata.synthetic import SyntheticDomain


def cdist_reference(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The previous implementation: all pairs of boundary pixels (quadratic), kept as the reference."""
    out = torch.full(pred.shape[:2], float("nan"))
    for b in range(pred.shape[0]):
        for c in range(pred.shape[1]):
            bp = torch.nonzero(boundary(pred[b, c].bool())).double()
            bg = torch.nonzero(boundary(target[b, c].bool())).double()
            if len(bp) == 0 or len(bg) == 0:
                continue
            d = torch.cdist(bp, bg)
            out[b, c] = (d.min(1).values.sum() + d.min(0).values.sum()) / (len(bp) + len(bg))
    return out


def test_same_values_as_all_pairs_on_synthetic_fundus_masks():
    masks = torch.stack([s.mask for s in SyntheticDomain("clean", n=6, size=96, split="test")]).bool()
    shifted = torch.roll(masks, shifts=(3, -2), dims=(2, 3))
    eroded = masks.clone()
    eroded[..., ::7, :] = False  # ragged boundaries: many boundary pixels, irregular shapes
    for pred in (shifted, eroded, masks):
        fast, ref = average_surface_distance(pred, masks), cdist_reference(pred, masks)
        assert torch.allclose(fast, ref, atol=1e-5, equal_nan=True), (fast, ref)


def test_same_values_on_random_blobs_and_nan_where_empty():
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(4, 2, 48, 48, generator=g) > 0.7
    target = torch.rand(4, 2, 48, 48, generator=g) > 0.6
    target[0, 1] = False  # empty: undefined
    fast, ref = average_surface_distance(pred, target), cdist_reference(pred, target)
    assert torch.isnan(fast[0, 1]) and torch.allclose(fast, ref, atol=1e-5, equal_nan=True)
