"""Predictions drawn over their images, for people to look at (numpy + Pillow).

A figure is one panel per mask set, side by side: the prediction and, where the site holds labels,
the expert mask, each titled, with a legend strip below (green: optic disc, blue: optic cup; a
filled tint for the region and a solid line for its outline).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

DISC, CUP = np.array([40, 220, 90]), np.array([60, 120, 255])  # green disc, blue cup
BAR = 16  # pixels of the title bar above each panel and of the legend strip below


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


def labelled(panels: list[tuple[str, np.ndarray]]) -> Image.Image:
    """Panels [(title, uint8 [H, W, 3])] side by side, each titled, with the colour legend below."""
    h, w = panels[0][1].shape[:2]
    width = max(w * len(panels), 150)  # room for the legend under a single small panel
    canvas = Image.new("RGB", (width, h + 2 * BAR), "white")
    pen, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for i, (title, rgb) in enumerate(panels):
        canvas.paste(Image.fromarray(rgb), (i * w, BAR))
        pen.text((i * w + 3, 2), title, fill="black", font=font)
    x, y = 3, h + BAR + 3
    for name, colour in (("disc", DISC), ("cup", CUP)):
        pen.rectangle((x, y, x + 10, y + 9), fill=tuple(int(c) for c in colour))
        pen.text((x + 14, y - 1), name, fill="black", font=font)
        x += 14 + int(pen.textlength(name, font=font)) + 10
    return canvas


def save_overlay(path: str | Path, image: torch.Tensor, probs: torch.Tensor, mask: torch.Tensor | None = None) -> Path:
    """Write the prediction (and, when given, the expert mask beside it) over the image as a labelled PNG."""
    panels = [("prediction", draw(image, probs))] + ([("expert mask", draw(image, mask))] if mask is not None else [])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    labelled(panels).save(path)
    return path
