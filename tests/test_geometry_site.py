"""The site's vote: the near-scale crop (weak, per-image evidence: the model's own disc size) is made
only when most of the site's images so far show another scale than the source's; it is kept with the
adapter's state and forgotten on reset."""
from __future__ import annotations

import math

import pytest
import torch

from grata.geometry import GeometryStep, crop

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
    assert step.votes == (1, 4, 0)
    assert _cropped(GeometryStep(REF, site_vote=0.0), 0.7)  # each image alone: the old behaviour


def test_a_site_imaging_smaller_crops_from_its_first_image_and_a_reset_forgets_it():
    step = GeometryStep(REF)
    assert all(_cropped(step, 0.7) for _ in range(3))
    assert not _cropped(step, 1.0)  # at the source's scale the crop is the whole image anyway
    assert _cropped(step, 0.7)  # 4 of 5
    step.reset()
    assert step.votes == (0, 0, 0)
    assert [_cropped(step, s) for s in (1.0, 0.7)] == [False, False]  # 1 of 2 is no majority


def test_the_votes_travel_with_the_adapters_state(tiny_model):
    from grata.adapters import build_adapter
    adapter = build_adapter("bn", tiny_model, geometry="auto", geometry_reference=REF)
    adapter.geometry.votes, adapter.geometry.shares = (3, 5, 2), [0.1, 0.12]
    state = adapter.state_dict()
    adapter.reset()
    assert adapter.geometry.votes == (0, 0, 0)
    adapter.load_state_dict(state)
    assert adapter.geometry.votes == (3, 5, 2) and adapter.geometry.shares == [0.1, 0.12]
    adapter.reset()
    adapter.images_seen = 7  # the state holds 0: a partial load would show
    with pytest.raises(ValueError, match="geometry_votes"):
        adapter.load_state_dict({**state, "geometry_votes": (6, 5, 0)})
    with pytest.raises(ValueError, match="geometry_votes"):
        adapter.load_state_dict({**state, "geometry_votes": (3, 5, 4)})  # more wider fields than other scales
    with pytest.raises(ValueError, match="geometry_votes"):
        adapter.load_state_dict({**state, "geometry_votes": (3,)})
    for shares in ([0.1, float("nan")], [0.1] * 17, [1.5]):
        with pytest.raises(ValueError, match="geometry_shares"):
            adapter.load_state_dict({**state, "geometry_shares": shares})
    assert adapter.images_seen == 7 and adapter.geometry.votes == (0, 0, 0) and adapter.geometry.shares == []  # refused before anything was loaded


# --- a site known to show a wider field skips the whole-image probe (site_min) ------------------------
def _probes(model):
    """The model, and the list of the inputs it was shown."""
    shown = []
    return (lambda x: shown.append(x) or model(x)), shown


def _whole_probe(shown: list[torch.Tensor], x: torch.Tensor) -> bool:
    return any(torch.equal(v, x) for v in shown)


def test_a_site_known_to_show_a_wider_field_skips_the_whole_image_probe():
    from tests.test_geometry import _disc_image, _scale_blind_model
    # a disc at ~0.6 of the source's size in a circular field: not small enough to route without the
    # model (sure_wide), so each image pays the whole-image probe until the site's vote is in
    image, disc = _disc_image(0.45, 0.55, 0.155, size=S)
    x = image[None]
    step = GeometryStep(REF, site_min=4)
    for i in range(6):
        probe, shown = _probes(_scale_blind_model)
        box, _, info = step.plan(x, probe)
        assert info["geo_wide"] == 1 and not box.is_whole(S, S)
        assert _whole_probe(shown, x) == (i < 4) and info["geo_site_known"] == float(i >= 4)
        inside = crop(disc[None, None], box, box.side, mode="nearest")
        assert inside.sum() == disc.sum()
    assert step.votes == (6, 6, 6)
    with pytest.raises(ValueError, match="site_min"):
        GeometryStep(REF, site_min=-1)
    never = GeometryStep(REF, site_min=0)  # every image probed
    for _ in range(6):
        probe, shown = _probes(_scale_blind_model)
        never.plan(x, probe)
        assert _whole_probe(shown, x)


def test_a_near_scale_site_sizes_its_crop_from_its_earlier_images_without_the_probe():
    """Drishti_GS-like: the model and the detector agree on a disc ~0.7 of the source's. The first
    images are routed and sized on the model's whole-image disc; then the site's median of those
    sizes the crop, centred on the rim, and the whole-image probe is skipped."""
    from tests.test_geometry import _bright_model, _disc_image
    image, disc = _disc_image(0.45, 0.55, 0.18, size=S)
    x = image[None]
    step = GeometryStep(REF, site_min=4)
    sides = []
    for i in range(6):
        probe, shown = _probes(_bright_model)
        box, _, info = step.plan(x, probe)
        assert _whole_probe(shown, x) == (i < 4) and info["geo_site_known"] == float(i >= 4)
        assert info["geo_wide"] == 0 and not box.is_whole(S, S)
        inside = crop(disc[None, None], box, box.side, mode="nearest")
        assert inside.sum() >= 0.98 * disc.sum()
        sides.append(box.side)
    assert step.votes == (6, 6, 0) and len(step.shares) == 4
    assert abs(sides[-1] / sides[0] - 1) < 0.1  # the same crop size as the probed images'


def test_a_site_wrongly_taken_for_a_wider_field_votes_itself_back_to_probing():
    from tests.test_geometry import _disc_image
    image, _ = _disc_image(0.5, 0.5, 0.155, size=S)
    x = image[None]
    step = GeometryStep(REF, site_min=4)
    step.votes = (4, 4, 4)  # as if its first images had shown a wider field
    big = _model_drawing(1.6)  # the model sees a disc larger than the source's in any crop
    for _ in range(4):
        probe, shown = _probes(big)
        box, _, info = step.plan(x, probe)
        assert box.is_whole(S, S)  # the refinement on the model's disc gives the whole image back
        assert info["geo_site_known"] == 1 and not _whole_probe(shown, x)
    assert step.votes == (4, 8, 4)  # each voted "the source's scale": no majority any more
    probe, shown = _probes(big)
    _, _, info = step.plan(x, probe)
    assert info["geo_site_known"] == 0 and _whole_probe(shown, x)


def test_a_mixed_site_a_site_without_refinement_and_an_old_state_do_not_use_a_protocol(tiny_model):
    from grata.adapters import build_adapter
    from tests.test_geometry import _disc_image, _scale_blind_model
    image, _ = _disc_image(0.45, 0.55, 0.155, size=S)
    x = image[None]
    mixed = GeometryStep(REF, site_min=4)
    mixed.votes, mixed.shares = (4, 4, 2), [0.19] * 4  # half wider fields, half near-scale crops
    probe, shown = _probes(_scale_blind_model)
    box, _, info = mixed.plan(x, probe)
    assert info["geo_site_known"] == 0 and _whole_probe(shown, x) and not box.is_whole(S, S)
    assert mixed.shares == [0.19] * 4  # a wider field's whole-image disc is the model's training size
    blind = GeometryStep(REF, site_min=4, refine=0)  # nothing could refine a wrong protocol back
    blind.votes = (4, 4, 4)
    probe, shown = _probes(_scale_blind_model)
    assert blind.plan(x, probe)[2]["geo_site_known"] == 0 and _whole_probe(shown, x)
    adapter = build_adapter("source", tiny_model, geometry="auto", geometry_reference=REF)
    adapter.load_state_dict({**adapter.state_dict(), "geometry_votes": (10, 10)})  # from before the wide count
    assert adapter.geometry.votes == (0, 0, 0)


def test_a_retry_back_to_the_whole_image_revises_the_sites_vote():
    from tests.test_geometry import _disc_image, _scale_blind_model
    image, _ = _disc_image(0.45, 0.55, 0.155, size=S)
    step = GeometryStep(REF, site_min=4)
    step.votes = (4, 4, 4)
    nothing = lambda t: torch.full((t.shape[0], 2, *t.shape[-2:]), -10.0)  # the adapter sees no disc in the crop
    step.apply(nothing, image[None], probe=_scale_blind_model)
    assert step.last["geo_site_known"] == 1 and step.last["geo_retried"] == 1 and step.last["geo_cropped"] == 0
    assert step.votes == (4, 5, 4)  # it voted "the source's scale", as its final crop says
