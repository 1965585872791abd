"""The site's vote: the near-scale crop (weak, per-image evidence: the model's own disc size) is made
only when most of the site's images so far show another scale than the source's; it is kept with the
adapter's state and forgotten on reset."""
from __future__ import annotations

import math

import pytest
import torch

from grata.geometry import GeometryStep

S = 128
REF = {"disc_share": 0.2, "detector_gain": 1.0, "min_contrast": 1.0}
FLAT = torch.full((1, 3, S, S), 0.4)  # no disc for the detector: only the model's pass can route it


def _model_drawing(side: float):
    """A model that draws a centred disc `side` times the source's linear size, whatever it is shown."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        s = x.shape[-1]
        yy, xx = torch.meshgrid(torch.arange(s) + 0.5, torch.arange(s) + 0.5, indexing="ij")
        disc = torch.hypot(yy - s / 2, xx - s / 2) <= side * math.sqrt(REF["disc_share"] / math.pi) * s
        return torch.where(disc, 10.0, -10.0).expand(x.shape[0], 2, s, s).clone()
    return forward


def _cropped(step: GeometryStep, side: float) -> bool:
    box, _, _ = step.plan(FLAT, _model_drawing(side))
    return not box.is_whole(S, S)


def test_one_small_disc_at_a_site_imaging_at_the_source_scale_is_left_whole():
    step = GeometryStep(REF)
    assert [_cropped(step, 1.0) for _ in range(3)] == [False] * 3
    assert not _cropped(step, 0.7)  # 1 of 4 images: the site does not image smaller
    assert step.votes == (1, 4)
    assert _cropped(GeometryStep(REF, site_vote=0.0), 0.7)  # each image alone: the old behaviour


def test_a_site_imaging_smaller_crops_from_its_first_image_and_a_reset_forgets_it():
    step = GeometryStep(REF)
    assert all(_cropped(step, 0.7) for _ in range(3))
    assert not _cropped(step, 1.0)  # at the source's scale the crop is the whole image anyway
    assert _cropped(step, 0.7)  # 4 of 5
    step.reset()
    assert step.votes == (0, 0)
    assert [_cropped(step, s) for s in (1.0, 0.7)] == [False, False]  # 1 of 2 is no majority


def test_the_votes_travel_with_the_adapters_state(tiny_model):
    from grata.adapters import build_adapter
    adapter = build_adapter("bn", tiny_model, geometry="auto", geometry_reference=REF)
    adapter.geometry.votes = (3, 5)
    state = adapter.state_dict()
    adapter.reset()
    assert adapter.geometry.votes == (0, 0)
    adapter.load_state_dict(state)
    assert adapter.geometry.votes == (3, 5)
    adapter.reset()
    adapter.images_seen = 7  # the state holds 0: a partial load would show
    with pytest.raises(ValueError, match="geometry_votes"):
        adapter.load_state_dict({**state, "geometry_votes": (6, 5)})
    assert adapter.images_seen == 7 and adapter.geometry.votes == (0, 0)  # refused before anything was loaded
