"""The geometry step's centre estimate and a site's crop protocol on the wire: the disc's centre,
not its brightest spot (the cup); the per-round summary; out-of-range values refused."""
from __future__ import annotations

import math

import pytest
import torch

from grata.federation.protocol import PLAIN_METRICS, PRIVATE_METRICS, ReplyRejected, audit
from grata.federation.strategies.base import RoundLog
from grata.geometry import GeometryStep, crop_summary, disc_centre, estimate_disc

S = 128
REF = {"disc_share": 0.2, "detector_gain": 1.0, "min_contrast": 1.0}


def _disc_with_cup(cy: float, cx: float, radius: float, cup_dx: float, seed: int = 0) -> torch.Tensor:
    """A textured field with a bright disc (radius, fractions of the side) and a brighter cup of half its
    radius shifted cup_dx disc radii sideways: the brightest part lies off the disc's centre, as in a fundus."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid((torch.arange(S) + 0.5) / S, (torch.arange(S) + 0.5) / S, indexing="ij")
    disc = torch.sigmoid((1 - torch.hypot(yy - cy, xx - cx) / radius) * 12)
    cup = torch.sigmoid((1 - torch.hypot(yy - cy, xx - cx - cup_dx * radius) / (0.5 * radius)) * 12)
    grey = 0.3 * (1 + 0.05 * torch.randn(S, S, generator=g)) + 0.3 * disc + 0.35 * cup
    fov = torch.hypot(yy - 0.5, xx - 0.5) <= 0.48
    return (grey.clamp(0, 1) * fov).expand(3, S, S).clone()


@pytest.mark.parametrize("where", [(0.5, 0.5), (0.35, 0.6), (0.62, 0.4)])
def test_the_centre_is_the_discs_not_the_cups(where):
    """The detector finds the cup (the brightest blob); disc_centre returns the whole disc's centre.
    detector_gain 2: the calibration maps the detector's blob (here the cup, half the disc's radius)
    to the disc's size, as the source's calibration does on real discs."""
    radius = 0.1
    image = _disc_with_cup(*where, radius, cup_dx=0.45)
    est = estimate_disc(image, {**REF, "detector_gain": 2.0})
    assert est.found
    det = math.hypot(est.cy - where[0], est.cx - where[1]) / radius
    cy, cx = disc_centre(image, est)
    ours = math.hypot(cy - where[0], cx - where[1]) / radius
    assert ours < 0.2, (det, ours)
    assert ours < det


def test_disc_centre_falls_back_to_the_detector_without_a_field():
    est = estimate_disc(torch.zeros(3, S, S), REF)
    assert disc_centre(torch.zeros(3, S, S), est) == (est.cy, est.cx)


def test_crop_summary_is_the_share_cropped_and_the_median_zoom():
    steps = [{"geo_cropped": 1.0, "geo_zoom": 2.5}, {"geo_cropped": 0.0, "geo_zoom": 1.0},
             {"geo_cropped": 1.0, "geo_zoom": 2.0}, {"quality": 0.8}]
    assert crop_summary(steps) == {"geo_cropped_share": pytest.approx(2 / 3), "geo_zoom": 2.0}
    assert crop_summary([{"quality": 0.8}]) == {}  # the step was off: nothing is sent
    log = RoundLog([{"quality": 0.8, "fallback": 0.0, **s} for s in steps[:3]], seconds=1.0, guard_resets=0)
    plain = log.plain_metrics()
    assert plain["geo_cropped_share"] == pytest.approx(2 / 3) and plain["geo_zoom"] == 2.0


def test_a_site_sending_an_out_of_range_crop_protocol_is_refused():
    """The keys are on a plain variant's list and checked for range; a private variant does not send them."""
    allowed = {"site": {"name", "status"}, "metrics": PLAIN_METRICS}
    ok = {"site": {"name": "a", "status": "ok"}, "metrics": {"images": 3, "geo_cropped_share": 0.5, "geo_zoom": 2.5}}
    audit(ok, allowed)
    for key, value in (("geo_cropped_share", 1.5), ("geo_cropped_share", -0.1), ("geo_zoom", 1e6), ("geo_zoom", 0.1)):
        with pytest.raises(ReplyRejected, match=key):
            audit({**ok, "metrics": {**ok["metrics"], key: value}}, allowed)
    assert not {"geo_cropped_share", "geo_zoom"} & PRIVATE_METRICS


def test_probe_options_are_validated():
    for bad in ({"probe_size": 16}, {"centre": "cup"}, {"settle": 0.7}):
        with pytest.raises(ValueError, match="geometry"):
            GeometryStep(REF, **bad)


def _centred_disc_model(x: torch.Tensor) -> torch.Tensor:
    """A model that draws a disc at the reference's share, centred in whatever it is given (the real
    source model's habit on a wider field), and counts its calls."""
    _centred_disc_model.calls += 1
    s = x.shape[-1]
    yy, xx = torch.meshgrid(torch.arange(s) + 0.5, torch.arange(s) + 0.5, indexing="ij")
    disc = torch.hypot(yy - s / 2, xx - s / 2) <= math.sqrt(REF["disc_share"] / math.pi) * s
    return torch.where(disc, 10.0, -10.0).expand(x.shape[0], 2, s, s).clone()


def _wide_image() -> torch.Tensor:
    """A small disc (linear size ~0.35 of the reference's) off-centre in a circular field of view."""
    return _disc_with_cup(0.4, 0.6, 0.09, cup_dx=0.0)


def test_a_clearly_wider_field_skips_the_whole_image_probe_and_a_settled_crop_stops_refining():
    """sure_wide: the detector alone routes a small disc in a visible aperture to the wider-field path
    (no whole-image probe); the first refinement finds the model's disc where the crop is centred,
    so the crop has settled and no second probe runs (early exit). Counted in geo_probes."""
    image = _wide_image()[None]
    _centred_disc_model.calls = 0
    box, _, info = GeometryStep(REF, sure_wide=0.6, refine=2).plan(image, _centred_disc_model)
    assert info["geo_wide"] == 1 and info["geo_model_side"] == -1.0
    assert _centred_disc_model.calls == info["geo_probes"] == 1 and info["geo_refined"] == 1
    cy, cx = (box.y0 + box.side / 2) / S, (box.x0 + box.side / 2) / S
    assert math.hypot(cy - 0.4, cx - 0.6) < 0.03
    _centred_disc_model.calls = 0
    _, _, info = GeometryStep(REF, sure_wide=0.0, refine=2).plan(image, _centred_disc_model)
    assert info["geo_wide"] == 1 and _centred_disc_model.calls == info["geo_probes"] == 2  # whole + one refinement
