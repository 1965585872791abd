"""Overlays say which panel is the prediction and which the expert mask, and which colour is which."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from grata.overlay import BAR, CUP, DISC, save_overlay


def test_overlay_has_titled_panels_and_a_colour_legend(tmp_path):
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 64, 64)
    mask[0, 16:48, 16:48], mask[1, 26:38, 26:38] = 1, 1
    rgb = np.array(Image.open(save_overlay(tmp_path / "o.png", image, mask, mask)))
    assert rgb.shape == (64 + 2 * BAR, 150, 3)  # two 64 px panels, widened for the legend, title and legend bars
    title = rgb[:BAR]
    assert (title < 100).all(-1).sum() > 20  # black title text over each panel
    legend = rgb[64 + BAR:].reshape(-1, 3)
    for colour in (DISC, CUP):
        assert (legend == colour).all(-1).sum() >= 50  # a swatch per structure
    only_prediction = np.array(Image.open(save_overlay(tmp_path / "p.png", image, mask)))
    assert only_prediction.shape[0] == 64 + 2 * BAR
