"""Predictions drawn over their images, for people to look at (pure numpy + Pillow)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

DISC, CUP = np.array([40, 220, 90]), np.array([60, 120, 255])  # green disc, blue cup


def _edge(mask: np.ndarray) -> np.ndarray:
    """The one-pixel boundary of a boolean mask [H, W]."""
    inner = mask.copy()
    inner[1:-1, 1:-1] = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    return mask & ~inner


def draw(image: torch.Tensor, masks: torch.Tensor) -> np.ndarray:
    """image [3, H, W] in [0, 1], masks [2, H, W] (disc, cup; probabilities or 0/1) -> uint8 [H, W, 3]."""
    rgb = (image.permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(np.float32)
    for m, colour in ((masks[0].numpy() > 0.5, DISC), (masks[1].numpy() > 0.5, CUP)):
        rgb[m] = 0.75 * rgb[m] + 0.25 * colour
        rgb[_edge(m)] = colour
    return rgb.astype(np.uint8)


def save_overlay(path: str | Path, image: torch.Tensor, probs: torch.Tensor, mask: torch.Tensor | None = None) -> Path:
    """Write the prediction (and, when given, the expert mask beside it) over the image as a PNG."""
    panels = [draw(image, probs)] + ([draw(image, mask)] if mask is not None else [])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(panels, axis=1)).save(path)
    return path
