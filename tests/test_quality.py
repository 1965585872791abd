"""The label-free quality estimate: its features on hand-made masks, its fit, and do-no-harm in the adapter."""
import numpy as np
import pytest
import torch

from grata.adapters import build_adapter
from grata.quality import (FEATURES, QualityModel, derived, ellipse_iou, features, frame_features, simulate_shift,
                           solidity, source_references)

yy, xx = np.mgrid[:64, :64]


def ellipse(cy, cx, ry, rx):
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def probs_of(disc: np.ndarray, cup: np.ndarray, p: float = 0.95) -> torch.Tensor:
    return torch.from_numpy(np.stack([disc, cup]).astype(np.float32)) * (2 * p - 1) + (1 - p)


def test_shape_features_separate_anatomy_from_failures():
    disc, cup = ellipse(32, 32, 16, 12), ellipse(32, 32, 7, 5)
    good = features(probs_of(disc, cup))
    assert good["disc_ellipse"] > 0.95 and good["disc_solidity"] > 0.9 and good["cup_in_disc"] == 1.0
    assert good["disc_components"] == 1 and 0.4 < good["cdr"] < 0.5
    two = disc | ellipse(6, 6, 4, 4)  # a second blob
    crescent = disc & ~ellipse(32, 40, 14, 10)
    assert ellipse_iou(two) < 0.8 and solidity(two) < 0.8
    assert solidity(crescent) < 0.8
    outside = features(probs_of(disc, ellipse(5, 55, 4, 4)))  # a cup outside the disc
    assert outside["cup_in_disc"] == 0.0
    assert derived(outside)["shape"] < derived(good)["shape"]


def test_agreement_counts_only_pixels_a_reference_saw():
    disc, cup = ellipse(32, 32, 16, 12), ellipse(32, 32, 7, 5)
    p = probs_of(disc, cup)
    unseen = p.clone()
    unseen[:, :, :10] = float("nan")
    unseen[0, 40:, 20:40] = 0.0  # a reference that misses part of the disc
    f = features(p, [p, unseen])
    assert f["disc_agreement"] < 100.0 and f["cup_agreement"] == pytest.approx(100.0)


def test_source_references_map_back_to_the_image_frame():
    # a "model" whose logits are a function of the pixel: its references must land where the pixel was
    x = torch.zeros(1, 3, 64, 64)
    x[..., 20:44, 24:40] = 1.0
    refs = source_references(lambda t: 20 * (t[:, :2] - 0.5), x)
    truth = x[0, 0] > 0.5
    for ref in refs:
        seen = ~torch.isnan(ref[0, 0])
        assert seen[16:48, 16:48].all()
        agree = ((ref[0, 0] > 0.5) == truth)[seen].float().mean()
        assert agree > 0.97


def test_frame_consistency_drops_when_the_crop_is_displaced_or_the_disc_disagrees_with_the_frame():
    disc = torch.from_numpy(ellipse(32, 32, 8, 8).astype(np.float32))  # a disc at the frame's centre, radius 1/8
    det = (32.5 / 64, 32.5 / 64, 8 / 64)  # the detector agrees
    centred = frame_features(disc, (16, 16, 32), disc, det)
    assert centred["geo_crop_offset"] < 0.05 and centred["geo_crop_edge"] == 0.0
    assert centred["geo_det_iou"] > 0.85 and centred["geo_det_scale"] < 0.1 and centred["geo_probe_iou"] == 1.0
    displaced = frame_features(disc, (24, 4, 32), disc, det)  # the crop slid off the disc: it cuts it
    assert displaced["geo_crop_offset"] > 0.3 > centred["geo_crop_offset"]
    assert displaced["geo_crop_edge"] > 0.0
    # the model drew a disc twice the size the detector and the whole-frame probe see
    big = torch.from_numpy(ellipse(32, 32, 16, 16).astype(np.float32))
    wrong = frame_features(big, (0, 0, 64), disc, det)
    assert wrong["geo_det_scale"] > 0.6 and wrong["geo_det_iou"] < 0.3 and wrong["geo_probe_iou"] < 0.3
    elsewhere = frame_features(disc, None, None, (10 / 64, 54 / 64, 8 / 64))  # the detector's disc is elsewhere
    assert elsewhere["geo_det_iou"] == 0.0 and elsewhere["geo_det_shift"] > 3
    none = frame_features(disc, None, None, None)  # no detector disc, no probe: the least consistent values
    assert none["geo_det_iou"] == 0.0 and none["geo_probe_scale"] == 2.0


def test_fit_is_monotone_in_its_evidence_and_clipped():
    rng = np.random.default_rng(0)
    rows, dice = [], []
    base = features(probs_of(ellipse(32, 32, 16, 12), ellipse(32, 32, 7, 5)), [])
    for _ in range(200):
        a = rng.uniform(20, 100)
        rows.append({**base, "disc_agreement": a, "cup_agreement": a + rng.normal(0, 5)})
        dice.append(a * 0.9 + rng.normal(0, 3))
    model = QualityModel.fit(rows, dice, list(FEATURES))
    low, high = model.predict({**base, "disc_agreement": 30, "cup_agreement": 30}), \
        model.predict({**base, "disc_agreement": 95, "cup_agreement": 95})
    assert high - low > 40
    assert model.predict({**base, "disc_agreement": 1e6, "cup_agreement": 1e6}) == 100.0
    assert QualityModel.from_dict(model.to_dict()).predict(rows[0]) == model.predict(rows[0])


def test_simulated_shift_moves_image_and_mask_together():
    x = torch.zeros(2, 3, 64, 64)
    y = torch.zeros(2, 2, 64, 64)
    x[..., 24:40, 24:40] = 1.0
    y[:, 0, 24:40, 24:40] = 1.0
    xs, ys = simulate_shift(x, y, torch.Generator().manual_seed(0))
    assert xs.shape == x.shape and ys.shape == y.shape and 0 <= xs.min() and xs.max() <= 1
    for b in range(2):  # the square stays where its mask went
        inside, outside = xs[b, 0][ys[b, 0] > 0.5].mean(), xs[b, 0][ys[b, 0] < 0.5].mean()
        assert inside > outside + 0.2


def area_quality() -> dict:
    """A quality model that scores by the disc's area: small discs (the collapsed adapter's) score low."""
    return QualityModel(["disc_area"], [0.0], [1.0], [30.0], 50.0).to_dict()


def test_a_collapsing_adapter_falls_back_to_the_source_and_is_reset(tiny_model):
    """Adaptation that wrecks the prediction (a huge Tent step): the estimate sees it, each image is
    answered by the source model instead, and the guard returns the parameters to the source."""
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    quality = area_quality()
    source = build_adapter("source", tiny_model, quality=quality, speed="faithful")
    src_logits = source.adapt_and_predict(x)
    adapter = build_adapter("tent", tiny_model, lr=50.0, bn="source", quality=quality, fallback=True,
                            guard=1.0, guard_warmup=2, speed="faithful")
    # collapse: push every BN bias far negative, as a runaway step would
    with torch.no_grad():
        for layer in adapter.norms:
            layer.bias.fill_(-50.0)
    resets, fallbacks = 0, 0
    for _ in range(4):
        logits = adapter.adapt_and_predict(x)
        fallbacks += adapter.last_step["fallback"]
        resets += adapter.last_step.get("guard_reset", 0.0)
        if adapter.last_step["fallback"]:
            torch.testing.assert_close(logits, src_logits)
        assert adapter.last_step["quality"] >= adapter.last_step["quality_source"] - 1e-6 or not adapter.last_step["fallback"]
    assert fallbacks >= 1 and resets >= 1 and adapter.guard_resets >= 1


def test_with_the_geometry_step_the_fallback_is_the_source_model_on_the_same_crop(tiny_model):
    """Geometry on: a collapsed adapter's images are answered by the source model on the disc's crop
    (what the source with the same geometry step returns), not by the source on the whole frame, whose
    disc is at the wrong scale; the candidates it chose between come back in the original frame."""
    from tests.test_geometry import REF, _disc_image
    image = _disc_image(0.35, 0.6, 0.06, size=64)[0][None]
    quality = QualityModel(["disc_area"], [0.0], [1.0], [-30.0], 50.0).to_dict()  # a disc filling the crop scores low
    whole = build_adapter("source", tiny_model, quality=quality, speed="faithful").adapt_and_predict(image)
    source = build_adapter("source", tiny_model, quality=quality, speed="faithful", geometry="auto",
                           geometry_reference=REF)
    source.geometry.retry = False  # an untrained net's crop answer would be judged implausible and retried whole
    source.geometry.use_model = False  # the detector's crop: an untrained net's own disc would place none
    cropped = source.adapt_and_predict(image)
    assert (cropped - whole).abs().max() > 1.0  # the crop changes the answer, so the check below can fail
    adapter = build_adapter("tent", tiny_model, lr=50.0, bn="source", quality=quality, fallback=True,
                            speed="faithful", geometry="auto", geometry_reference=REF)
    adapter.geometry.retry = False
    adapter.geometry.use_model = False
    with torch.no_grad():
        for layer in adapter.norms:
            layer.bias.fill_(50.0)  # runaway: disc everywhere
    logits = adapter.adapt_and_predict(image)
    assert adapter.last_step["geo_cropped"] == 1 and adapter.last_step["fallback"] == 1
    torch.testing.assert_close(logits, cropped)
    adapted, source = adapter.last_candidates
    assert adapted.shape == source.shape == (1, 2, 64, 64)
    torch.testing.assert_close(source, cropped)


def test_guard_state_survives_a_new_adapter(tiny_model):
    """The guard's memory is part of the adapter's state: a fresh process continues it."""
    quality = area_quality()
    make = lambda: build_adapter("tent", tiny_model, lr=1e-3, bn="source", quality=quality, guard=5.0,  # noqa: E731
                                 guard_warmup=3, speed="faithful")
    a = make()
    xs = [torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    for x in xs[:2]:
        a.adapt_and_predict(x)
    state = a.state_dict()
    b = make()
    b.load_state_dict(state)
    assert (b.guard_ema, b.guard_seen) == (a.guard_ema, a.guard_seen) and b.guard_seen == 2
    for x in xs[2:]:
        torch.testing.assert_close(a.adapt_and_predict(x), b.adapt_and_predict(x))
        assert a.last_step == b.last_step


SECOND_ROUND = """
import json, sys
from client.site import Site, SiteConfig, open_site_data
spec = json.load(open(sys.argv[1]))
cfg = SiteConfig(**spec["site_config"])
out = Site("gamma", open_site_data(cfg, "gamma"), spec["state"], cfg, spec["checkpoint"]).run_round(2)
print(json.dumps(out["metrics"]))
"""


def test_one_method_on_every_path_across_a_process_restart(tmp_path, checkpoint):
    """simulations.evaluate and a federation site (round 2 in a new process) predict the same images the
    same way with the default preset: per-round Dice and quality equal evaluate's per-image records."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from client.site import Site, SiteConfig, chunk, open_site_data
    from grata.config import DataConfig, MethodConfig
    from grata.models import load_checkpoint
    from simulations.evaluate import evaluate_method
    from tests.conftest import tiny_config

    preset = yaml.safe_load(Path("conf/method/fedgrata.yaml").read_text())
    options = {**preset["options"], "guard_warmup": 1}  # the guard's state is live from the first image on
    cfg = tiny_config(tmp_path, checkpoint)
    data = {**cfg.data.__dict__, "sites": ["gamma"], "targets": ["gamma"], "target_split": "test"}
    site_cfg = SiteConfig(data=data, adapter=preset["adapter"], options=options, rounds=2, overlays=0)
    model, meta = load_checkpoint(checkpoint)
    _, rows = evaluate_method("fedgrata", MethodConfig(preset["adapter"], options), model, DataConfig(**data), None,
                              seed=0, shift_reference=meta["shift_reference"], quality=meta["quality"],
                              geometry_reference=meta["geometry"])
    first = Site("gamma", open_site_data(site_cfg, "gamma"), tmp_path / "state", site_cfg, checkpoint).run_round(1)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"site_config": site_cfg.__dict__, "state": str(tmp_path / "state"),
                                "checkpoint": str(checkpoint)}))
    done = subprocess.run([sys.executable, "-c", SECOND_ROUND, str(spec)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    second = json.loads(done.stdout.strip().splitlines()[-1])
    for rnd, metrics in ((1, first["metrics"]), (2, second)):
        images = [rows[i] for i in chunk(len(rows), 2, rnd)]
        assert metrics["dice_mean"] == pytest.approx(np.mean([r["dice_mean"] for r in images]), abs=1e-9)
        assert metrics["dice_proxy"] == pytest.approx(np.mean([r["quality"] for r in images]), abs=1e-9)


def agreement_quality() -> dict:
    """Estimated Dice = the prediction's mean agreement with the source model's perturbed references."""
    names = list(FEATURES)
    coef = [0.0] * len(names)
    coef[names.index("disc_agreement")] = coef[names.index("cup_agreement")] = 0.5
    return QualityModel(names, [0.0] * len(names), [1.0] * len(names), coef, 0.0).to_dict()


def test_a_collapsing_site_in_the_federation_falls_back_is_flagged_and_its_guard_spans_rounds(tmp_path, checkpoint):
    """Tent with a runaway rate at one site: every image is answered by the source model (fallback), the
    coordinator flags the site, and the guard, whose warm-up (3 images) spans two rounds of 2 images
    each in new Site objects, fires in round 2: its state survived the restart."""
    from grata.models import load_checkpoint, save_checkpoint
    from tests.conftest import run_tiny

    model, meta = load_checkpoint(checkpoint)
    collapsing = tmp_path / "source.pt"
    save_checkpoint(collapsing, model, shift_reference=meta["shift_reference"], quality=agreement_quality())
    collapsing.with_suffix(".json").write_text("{}")
    result, grid = run_tiny(tmp_path, collapsing, "method=tent", "method.options.lr=1.0", "method.options.bn=source",
                            "+method.options.fallback=true", "+method.options.guard=1.0",
                            "+method.options.guard_warmup=3", "federation.reset_on_drop=false")
    by_round: dict[int, list] = {}
    for reply in grid.replies:
        by_round.setdefault(int(reply.metadata.group_id), []).append(reply.content["metrics"])
    assert sorted(by_round) == [1, 2]
    for metrics in by_round[1]:
        assert metrics["fallback_share"] == 1.0 and metrics["guard_resets"] == 0  # still in the guard's warm-up
    assert all(m["guard_resets"] >= 1 for m in by_round[2])  # image 3: only if round 1's guard state was kept
    assert all(row["flagged"] >= 1 for row in result["sites"].values())


def test_an_old_checkpoint_gets_the_geometry_aware_quality_model_written_weights_unchanged(tmp_path):
    """ensure_source refits a quality model of version 1 (the ridge over four signals) into the file as
    version 2 (expected Dice + the source's offset), without touching the weights; a second call leaves it.
    The source digest a site pins covers the quality model: it changes with it."""
    import grata.train_source as ts
    from grata.config import DataConfig
    from grata.federation.siteconfig import source_digest, weights_digest
    from grata.models import ModelConfig, load_checkpoint
    from grata.quality import ESTIMATE, QUALITY_VERSION, quality_version
    from tests.conftest import SIZE, tiny_source

    path = tiny_source(tmp_path / "old.pt", shift_reference=1.0)
    path.with_suffix(".json").write_text("{}")
    before, meta = load_checkpoint(path)
    meta["quality"]["info"].pop("version")  # a checkpoint written before versions existed
    from grata.models import save_checkpoint
    save_checkpoint(path, before, **meta)
    assert quality_version(meta["quality"]) == 1
    pinned = source_digest(before, meta)
    data = DataConfig(kind="synthetic", size=SIZE, synthetic_train=4)
    cfg = ts.TrainSourceConfig(data=data, model=ModelConfig(encoder="resnet18", decoder_width=16), checkpoint=str(path))
    assert ts.ensure_source(cfg, None) == path
    after, meta = load_checkpoint(path)
    assert weights_digest(after) == weights_digest(before) and source_digest(after, meta) != pinned
    q = meta["quality"]
    assert quality_version(q) == QUALITY_VERSION and q["names"] == list(ESTIMATE) and q["info"]["images"] == 4
    assert q["coef"] == [1.0] and q["mean"] == [0.0] and q["scale"] == [1.0]  # the signal's own ranking, shifted
    stamp = path.stat().st_mtime_ns
    ts.ensure_source(cfg, None)
    assert path.stat().st_mtime_ns == stamp  # already current: not refitted again



def test_a_quality_model_that_would_estimate_nan_or_is_unbounded_is_refused():
    """The quality model arrives with the source model and decides fallbacks and the guard: a NaN
    intercept, a zero scale, mismatched lengths or a version from newer code are refused on load."""
    good = QualityModel(["expected"], [0.0], [1.0], [1.0], 8.0, {"version": 2, "images": 4}).to_dict()
    assert QualityModel.from_dict(good).predict({"disc_expected": 80.0, "cup_expected": 60.0, "disc_soft_dice": 0,
                                                 "cup_soft_dice": 0, "disc_components": 1, "cup_components": 1,
                                                 "cdr": 0.5, "disc_ellipse": 1, "disc_solidity": 1, "cup_solidity": 1,
                                                 "cup_in_disc": 1, "disc_largest": 1, "cup_largest": 1}) == 78.0
    bad = {"nan intercept": {**good, "intercept": float("nan")}, "zero scale": {**good, "scale": [0.0]},
           "lengths": {**good, "coef": [1.0, 2.0]}, "inf coef": {**good, "coef": [float("inf")]},
           "newer version": {**good, "info": {"version": 99, "images": 4}},
           "unbounded": {**good, "names": ["expected"] * 65, "mean": [0.0] * 65, "scale": [1.0] * 65, "coef": [1.0] * 65}}
    for what, d in bad.items():
        with pytest.raises(ValueError, match="quality model"):
            QualityModel.from_dict(d)
