"""The geometry step: exact crop/map-back on masks, the disc found anywhere at several scales,
the whole image when there is no disc, and the adapter hook."""
from __future__ import annotations

import math

import pytest
import torch

from grata.adapters import build_adapter
from grata.config import DataConfig
from grata.geometry import (Box, GeometryStep, build_geometry, crop, disc_centre, estimate_disc, geometry_reference,
                            paste, rim_centre)
from grata.synthetic import STYLES, SyntheticDomain, render, _generator
from grata.widefield import widen

S = 128


def _masks(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(2, 2, S, S, generator=g) > 0.5).float()


@pytest.mark.parametrize("box", [Box(0, 0, S), Box(10, 20, 64), Box(-16, 90, 64), Box(40, -8, 32), Box(-64, 30, 128)])
def test_crop_and_paste_back_is_exact_on_masks(box):
    """Integer zooms in (the model size is a multiple of the crop side) and crops reaching past the
    frame: every mask pixel inside the crop comes back unchanged, the rest is the fill."""
    m = _masks()
    back = paste(crop(m, box, S, mode="nearest"), box, (S, S), fill=0.0, mode="nearest")
    inside = torch.zeros(S, S, dtype=torch.bool)
    inside[max(box.y0, 0):box.y0 + box.side, max(box.x0, 0):box.x0 + box.side] = True
    assert torch.equal(back[..., inside], m[..., inside])
    assert not back[..., ~inside].any()


def test_crop_outside_the_frame_is_refused():
    with pytest.raises(ValueError, match="outside"):
        crop(_masks(), Box(S + 5, 0, 16), S)


def _disc_image(cy: float, cx: float, radius: float, size: int = S, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A wide-field fundus-like image with one bright disc at (cy, cx), radius as fractions of the side."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid((torch.arange(size) + 0.5) / size, (torch.arange(size) + 0.5) / size, indexing="ij")
    d = torch.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / radius
    base = torch.tensor([0.6, 0.3, 0.15]).view(3, 1, 1) * (1 + 0.05 * torch.randn(1, size, size, generator=g))
    img = base + torch.sigmoid((1 - d) * 12) * torch.tensor([0.3, 0.4, 0.3]).view(3, 1, 1)
    fov = torch.sqrt((yy - 0.5) ** 2 + (xx - 0.5) ** 2) <= 0.48
    return (img.clamp(0, 1) * fov), (d <= 1).float()


REF = {"disc_share": 0.2, "detector_gain": 1.0, "min_contrast": 1.0}


@pytest.mark.parametrize("radius", [0.05, 0.09, 0.14])
@pytest.mark.parametrize("where", [(0.5, 0.5), (0.3, 0.7), (0.65, 0.3), (0.72, 0.6)])
def test_a_disc_anywhere_at_three_scales_is_found(radius, where):
    image, disc = _disc_image(*where, radius)
    est = estimate_disc(image, REF)
    assert est.found
    assert math.hypot(est.cy - where[0], est.cx - where[1]) < max(radius * 0.5, 2 / 96)
    assert 0.6 < est.radius / radius < 1.6
    # and the chosen crop holds the whole disc, at about the reference's share
    box = GeometryStep(REF).choose_box(est, S)
    inside = crop(disc[None, None], box, box.side, mode="nearest")
    assert inside.sum() == disc.sum()
    assert 0.5 < inside.mean().item() / REF["disc_share"] < 2.0


def test_no_disc_falls_back_to_the_whole_image():
    """Texture only (no compact bright blob) and an all-black frame: no disc, the step runs on the image as it is."""
    g = torch.Generator().manual_seed(3)
    flat = (torch.tensor([0.6, 0.3, 0.15]).view(3, 1, 1) + 0.02 * torch.randn(3, S, S, generator=g)).clamp(0, 1)
    ref = {"disc_share": 0.2, "detector_gain": 1.0, "min_contrast": 6.0}
    step = GeometryStep(ref)
    for image in (flat, torch.zeros(3, S, S)):
        seen = []
        out = step.apply(lambda x: seen.append(x) or torch.zeros(1, 2, S, S), image[None])
        assert not estimate_disc(image, ref).found
        assert torch.equal(seen[0], image[None]) and len(seen) == 1
        assert step.last["geo_cropped"] == 0 and out.shape == (1, 2, S, S)


def test_whole_image_kept_when_the_site_already_images_at_the_source_scale():
    image, _ = _disc_image(0.5, 0.5, 0.25)
    step = GeometryStep(REF)
    seen = []
    step.apply(lambda x: seen.append(x) or torch.zeros(1, 2, S, S), image[None])
    assert torch.equal(seen[0], image[None])


def test_apply_crops_segments_and_maps_back_into_the_original_frame():
    """A step that predicts the disc of its input by brightness: mapped back, it matches the true disc."""
    image, disc = _disc_image(0.3, 0.62, 0.07)
    step = GeometryStep(REF)

    def segment(x):  # an oracle-free "model": the bright blob of whatever crop it is given
        bright = x.mean(1, keepdim=True) > 0.6 * x.mean(1, keepdim=True).amax()
        return torch.where(bright, 10.0, -10.0).repeat(1, 2, 1, 1)

    logits = step.apply(segment, image[None])
    assert logits.shape == (1, 2, S, S) and step.last["geo_cropped"] == 1
    pred = torch.sigmoid(logits[0, 0]) > 0.5
    dice = 2 * (pred & disc.bool()).sum() / (pred.sum() + disc.sum())
    assert dice > 0.85


def test_retry_restores_the_adapter_state_and_recrops():
    """A first crop whose prediction fills the crop is re-run on a wider crop from the saved state."""
    image, _ = _disc_image(0.5, 0.4, 0.08)
    step = GeometryStep(REF)
    calls, state = [], {"v": 0}

    def fill_then_fine(x):
        calls.append(x.shape)
        state["v"] += 1
        out = torch.full((1, 2, S, S), -10.0)
        if len(calls) == 1:
            out[:] = 10.0  # the disc fills and touches the whole crop: too tight
        else:
            out[:, :, 40:88, 40:88] = 10.0
        return out

    step.apply(fill_then_fine, image[None], snapshot=lambda: dict(state), restore=lambda s: state.update(s))
    assert len(calls) == 2 and step.last["geo_retried"] == 1
    assert state["v"] == 1  # restored to the snapshot before the second step


def test_reference_from_source_masks_and_clear_errors():
    ds = SyntheticDomain("clean", n=6, size=S)
    images = torch.stack([ds[i].image for i in range(6)])
    masks = torch.stack([ds[i].mask for i in range(6)])
    ref = geometry_reference(images, masks)
    assert 0.02 < ref["disc_share"] < 0.5 and ref["detector_gain"] > 0 and ref["images"] == 6
    with pytest.raises(ValueError, match="no source training mask"):
        geometry_reference(images, torch.zeros_like(masks))
    with pytest.raises(ValueError, match="geometry='auto' needs"):
        build_geometry("auto", None)
    for gain in (0.0, -1.0, float("nan"), float("inf")):  # a reference sent with the model is checked, not trusted
        with pytest.raises(ValueError, match="detector_gain"):
            build_geometry("auto", {**ref, "detector_gain": gain})
    with pytest.raises(ValueError, match="geometry='sometimes'"):
        build_geometry("sometimes", ref)
    assert build_geometry("off", None) is None


def test_every_adapter_takes_the_option_and_predicts_in_the_original_frame(tiny_model):
    image, _ = _disc_image(0.35, 0.6, 0.06, size=64)
    for name in ("source", "bn", "tent", "grata"):
        adapter = build_adapter(name, tiny_model, geometry="auto", geometry_reference=REF)
        out = adapter.adapt_and_predict(image[None])
        assert out.shape == (1, 2, 64, 64)
        assert adapter.last_step["geo_found"] == 1 and adapter.describe()["geometry"] == "auto"


def test_wide_field_data():
    """The synthetic wide_field style: a small disc in a black-surrounded circular field; widen keeps
    the mask with the image."""
    img, mask = render(S, STYLES["wide_field"], _generator(0, "wide_field", "test", 0))
    assert img[:, 0, 0].abs().max() == 0 and mask[0].mean() < 0.06
    base = SyntheticDomain("clean", n=1, size=S)[0]
    wide, wmask = widen(base.image, base.mask, 0.5, base.name)
    assert wide.shape == base.image.shape and abs(wmask[0].sum() / base.mask[0].sum() - 0.25) < 0.03
    assert wide[:, 0, 0].abs().max() == 0
    with pytest.raises(ValueError, match="field_scale"):
        DataConfig(field_scale=1.5)
    from grata.config import open_domain
    from grata.widefield import WideField

    cfg = DataConfig(size=64, synthetic_test=2, field_scale=0.5)
    assert isinstance(open_domain(cfg, "gamma", "test"), WideField)
    assert not isinstance(open_domain(cfg, cfg.source, "test"), WideField)  # the source keeps its protocol


def test_evaluate_runs_the_geometry_methods_end_to_end(tmp_path):
    """train_source stores the source's geometry; evaluate passes it to the methods that ask for the
    step; data.field_scale widens the targets (never the source); the per-image records carry the estimate."""
    import csv
    import json

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from pathlib import Path

    import simulations.evaluate as evaluate

    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="evaluate", overrides=[
            "data.size=64", "data.synthetic_train=8", "data.synthetic_test=2", "data.targets=[gamma]",
            "data.field_scale=0.5", "train.epochs=1", f"checkpoint={tmp_path}/src.pt", f"out_dir={tmp_path}/out",
            "run=[source,source_geometry]"]))
    results = evaluate.run(cfg)
    assert json.loads((tmp_path / "src.json").read_text())["geometry"]["images"] == 8
    assert results["source_geometry"]["describe"]["geometry"] == "auto"
    assert results["source"]["describe"]["geometry"] == "off"
    with (tmp_path / "out" / "per_image.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["method"] == "source_geometry"]
    assert len(rows) == 2 and all(r["geo_found"] != "" and float(r["geo_zoom"]) >= 1 for r in rows)


def test_crop_protocol_summarises_a_sites_scale():
    from grata.geometry import crop_protocol

    ests = [estimate_disc(_disc_image(0.4, 0.6, r, seed=i)[0], REF) for i, r in enumerate((0.06, 0.07, 0.08))]
    p = crop_protocol(ests, REF)
    assert p["found_share"] == 1 and 0.1 < p["relative_scale"] < 0.4
    assert abs(p["centre_y"] - 0.4) < 0.05 and abs(p["centre_x"] - 0.6) < 0.05
    assert crop_protocol([], REF)["found_share"] == 0


# --- the two paths: the model's own disc near the source's scale, the detector's on a wider field ---------
def _bright_model(x: torch.Tensor) -> torch.Tensor:
    """A scale-aware stand-in for the model: the bright blob of whatever it is given."""
    g = x.mean(1, keepdim=True)
    return torch.where(g > 0.6 * g.amax(), 10.0, -10.0).repeat(1, 2, 1, 1)


def _scale_blind_model(x: torch.Tensor) -> torch.Tensor:
    """Like the real source model on a wider field: a centred disc at the reference's share of
    whatever crop it is given, wherever the true disc is."""
    s = x.shape[-1]
    yy, xx = torch.meshgrid(torch.arange(s) + 0.5, torch.arange(s) + 0.5, indexing="ij")
    r = math.sqrt(REF["disc_share"] / math.pi) * s
    disc = ((yy - s / 2) ** 2 + (xx - s / 2) ** 2) <= r * r
    return torch.where(disc, 10.0, -10.0).expand(x.shape[0], 2, s, s).clone()


def test_predicted_disc_is_the_largest_component_in_frame_units():
    from grata.geometry import predicted_disc

    logits = torch.full((1, 2, 64, 64), -5.0)
    logits[0, 0, 10:30, 20:40] = 5.0  # the disc
    logits[0, 0, 50:53, 2:5] = 5.0  # a speck that would drag the centroid
    d = predicted_disc(logits, Box(32, 0, 64), 128)  # a crop of side 64 at (32, 0) in a 128 frame
    assert abs(d.cy - (32 + 20) / 128) < 1e-6 and abs(d.cx - 30 / 128) < 1e-6
    assert abs(d.share - 400 / 128 ** 2) < 1e-9 and d.edge == 0
    assert predicted_disc(torch.full((1, 2, 8, 8), -5.0), Box(0, 0, 8), 8) is None


def test_a_scale_blind_model_takes_the_detectors_path_and_the_crop_holds_the_disc():
    """On a wider field the model draws a disc at its training share wherever it looks, so its
    whole-image disc is far larger than the detector's: the crop must start from the detector."""
    image, disc = _disc_image(0.35, 0.62, 0.06)
    step = GeometryStep(REF)
    box, est, info = step.plan(image[None], _scale_blind_model)
    assert info["geo_wide"] == 1 and not box.is_whole(S, S)
    inside = crop(disc[None, None], box, box.side, mode="nearest")
    assert inside.sum() == disc.sum()  # the whole disc is in the crop
    assert 0.4 < inside.mean().item() / REF["disc_share"] < 2.5


def test_near_the_source_scale_the_crop_follows_the_models_own_disc():
    """A disc a little smaller than the source's (Drishti_GS-like): the model's disc places the crop,
    re-centred with the gain toward where the model sees it."""
    image, disc = _disc_image(0.45, 0.55, 0.18)
    step = GeometryStep(REF)
    box, _, info = step.plan(image[None], _bright_model)
    assert info["geo_wide"] == 0 and not box.is_whole(S, S)
    cy, cx = (box.y0 + box.side / 2) / S, (box.x0 + box.side / 2) / S
    assert math.hypot(cy - 0.45, cx - 0.55) < 0.03
    inside = crop(disc[None, None], box, box.side, mode="nearest")
    assert inside.sum() >= 0.98 * disc.sum()


def test_a_disc_at_the_source_scale_keeps_the_whole_image_with_a_probe():
    image, _ = _disc_image(0.5, 0.5, 0.25)
    seen = []
    step = GeometryStep(REF)
    step.apply(lambda x: seen.append(x) or _bright_model(x), image[None], probe=_bright_model)
    assert torch.equal(seen[0], image[None]) and step.last["geo_cropped"] == 0


def test_recentring_moves_gain_times_the_offset_the_model_reports():
    from grata.geometry import PredictedDisc

    step = GeometryStep(REF, gain=2.0)
    box = Box(32, 32, 64)  # centre (64, 64) of a 128 frame
    disc = PredictedDisc(cy=70 / 128, cx=60 / 128, share=REF["disc_share"] * (64 / 128) ** 2, edge=0.0)
    nxt = step._recentre(disc, box, 128)
    assert nxt.side == 64 and (nxt.y0 + 32, nxt.x0 + 32) == (76, 56)
    cut = step._recentre(PredictedDisc(0.5, 0.5, disc.share, edge=0.2), box, 128)
    assert cut.side == 96  # a disc cut by the crop's edge widens the crop by half again


def test_a_crop_in_which_the_adapter_sees_no_disc_goes_back_to_the_whole_image():
    """The probe places a crop; the adapter's step then finds nothing in it: its state is restored and
    the image is segmented as it is."""
    image, _ = _disc_image(0.35, 0.62, 0.06)
    step = GeometryStep(REF, refine=0)
    calls, state = [], {"v": 0}

    def nothing_then_whole(x):
        calls.append(x)
        state["v"] += 1
        return torch.full((1, 2, S, S), -10.0)

    step.apply(nothing_then_whole, image[None], snapshot=lambda: dict(state),
               restore=lambda s: state.update(s), probe=_scale_blind_model)
    assert len(calls) == 2 and torch.equal(calls[1], image[None])
    assert step.last["geo_retried"] == 1 and step.last["geo_cropped"] == 0 and state["v"] == 1


def test_geometry_options_are_validated():
    for bad in ({"route": 0}, {"refine": -1}, {"gain": 5}, {"min_contrast": -1}):
        with pytest.raises(ValueError, match="route="):
            GeometryStep(REF, **bad)


def test_a_visible_aperture_or_a_high_contrast_lets_the_detector_set_the_scale():
    """The wider-field path needs evidence that the disc is a small part of the field. With the contrast
    bar out of reach, a full-field image (circular aperture visible) still takes it; the same retina
    filling the frame (a tight crop, no aperture) stays on the model's path."""
    image, _ = _disc_image(0.4, 0.55, 0.07)
    framed = image.clone()
    framed[:, image.amax(0) == 0] = torch.tensor([0.6, 0.3, 0.15]).view(3, 1)  # fill the black surround with retina
    step = GeometryStep(REF, min_contrast=1e9)
    assert estimate_disc(image, REF).field < 0.8 and estimate_disc(framed, REF).field > 0.99
    assert step.plan(image[None], _scale_blind_model)[2]["geo_wide"] == 1
    assert step.plan(framed[None], _scale_blind_model)[2]["geo_wide"] == 0
    assert GeometryStep(REF).plan(framed[None], _scale_blind_model)[2]["geo_wide"] == 1  # a clear blob suffices


def _disc_with_cup(cy: float, cx: float, radius: float, seed: int = 0) -> torch.Tensor:
    """`_disc_image` plus a bright cup of half the disc's radius, off the disc's centre by a third of
    its radius (as in real discs: the pale cup shows mostly in green, the rim in red)."""
    image, _ = _disc_image(cy, cx, radius, seed=seed)
    yy, xx = torch.meshgrid((torch.arange(S) + 0.5) / S, (torch.arange(S) + 0.5) / S, indexing="ij")
    d = torch.sqrt((yy - cy) ** 2 + (xx - cx - radius / 3) ** 2) / (radius / 2)
    cup = torch.sigmoid((1 - d) * 12) * torch.tensor([0.05, 0.35, 0.25]).view(3, 1, 1)
    return (image + cup * (image.amax(0) > 0)).clamp(0, 1)


@pytest.mark.parametrize("radius", [0.06, 0.09, 0.13])
@pytest.mark.parametrize("where", [(0.5, 0.5), (0.3, 0.62), (0.66, 0.35)])
def test_the_rim_finds_the_discs_centre_and_radius_from_a_start_off_centre(radius, where):
    """A start 0.42 radii off the disc (where the blob detector's pull toward the brighter cup leaves
    real starts): the rim's circle comes back to the disc's own centre, and measures its radius
    better than the detector."""
    image = _disc_with_cup(*where, radius)
    est = estimate_disc(image, REF)
    start = (where[0] + 0.3 * radius, where[1] - 0.3 * radius)
    cy, cx, r = rim_centre(image, est, start)
    assert math.hypot(cy - where[0], cx - where[1]) < 0.12 * radius
    assert abs(r / radius - 1) < min(0.1, abs(est.radius / radius - 1))


def test_the_wider_field_crop_starts_where_the_rim_is_by_default(monkeypatch):
    """The default centre is the rim's: the plan's wider-field crop is centred on what rim_centre
    returns (here a stand-in), and on disc_centre's estimate with centre="disc"."""
    import grata.geometry as geometry

    image = _disc_with_cup(0.45, 0.55, 0.08)
    calls = []

    def fake_rim(img, est, start):
        calls.append(start)
        return start[0] + 0.05, start[1] - 0.05, est.radius

    monkeypatch.setattr(geometry, "rim_centre", fake_rim)
    step = GeometryStep(REF, min_contrast=0.0, refine=0)
    assert step.centre == "rim"
    box = step.plan(image[None], _scale_blind_model)[0]
    start = calls[-1]
    assert start == disc_centre(image, estimate_disc(image, REF))  # searched around disc_centre's estimate
    centre = ((box.y0 + box.side / 2) / S, (box.x0 + box.side / 2) / S)
    assert math.hypot(centre[0] - start[0] - 0.05, centre[1] - start[1] + 0.05) < 1.5 / S
    box = GeometryStep(REF, centre="disc", min_contrast=0.0, refine=0).plan(image[None], _scale_blind_model)[0]
    assert math.hypot((box.y0 + box.side / 2) / S - start[0], (box.x0 + box.side / 2) / S - start[1]) < 1.5 / S
    assert len(calls) == 1


def test_without_a_disc_or_a_rim_the_rim_keeps_the_start():
    flat = torch.full((3, S, S), 0.4)
    est = estimate_disc(flat, REF)
    assert rim_centre(flat, est, (0.3, 0.6)) == (0.3, 0.6, est.radius)
    # a disc the detector finds (bright in green) with no edge in red: nothing to go by, the start stays
    image = _disc_with_cup(0.5, 0.5, 0.1)
    image[0] = 0.5
    est = estimate_disc(image, REF)
    assert est.found
    assert rim_centre(image, est, (0.5, 0.5)) == (0.5, 0.5, est.radius)
