"""fed_kin played as the attackers would play it (an honest-but-curious coordinator, a lying site), and
its one decision: a site switches early only on matching, confirmed evidence of sites like it."""
from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

import grata.privacy as privacy
from client.site import Site, open_site_data
from grata.federation.protocol import ReplyRejected
from grata.federation.strategies.fed_kin import FedKin, shift_sigma
from grata.kin import LOG_SHIFT_MAX, KinRow, accumulate, confirms, log_shift, release_std
from server.config import FederationConfig, Variant
from server.coordinator import Coordinator
from tests.test_attacks import Swapped, limits, site_config
from wire import audit

KIN_KEYS = {"images", "skipped", "stats_images", "dice_proxy", "stem_shift"}


@pytest.fixture(scope="module")
def mid_checkpoint(tmp_path_factory):
    """A tiny source model whose shift reference puts synthetic gamma images mid-range (log shift ~3),
    so that the released values are not all at a bound."""
    from grata.adapters import build_adapter
    from grata.models import load_checkpoint
    from tests.conftest import tiny_source

    path = tiny_source(tmp_path_factory.mktemp("kin") / "probe.pt", shift_reference=1.0)
    model, _ = load_checkpoint(path)
    probe = build_adapter("source", model, shift_reference=1.0)
    cfg = site_config(variant="fed_kin")
    stem = privacy.SourcePass(model).moments(open_site_data(cfg, "gamma")[0].image[None])[0]
    ratio = probe.stem_ratio(*stem)  # the shift in units of a reference of 1
    return tiny_source(tmp_path_factory.mktemp("kin") / "source.pt", shift_reference=ratio / math.expm1(3.0))


def kin_site(tmp_path, checkpoint, data=None, **kw):
    cfg = site_config(variant="fed_kin", options={"lr": 1e-3, "bn": "auto", "auto_warmup": 4}, **kw)
    data = data if data is not None else open_site_data(cfg, "gamma")
    return Site("gamma", data, tmp_path, cfg, checkpoint, limits=limits(tmp_path)), cfg


def test_one_replaced_image_moves_the_stem_shift_sum_by_at_most_its_bound(tmp_path, mid_checkpoint, monkeypatch):
    """Pre-noise sums: round 1 (the replaced image) moves by <= LOG_SHIFT_MAX, round 2 not at all."""
    sums: list[float] = []
    real = privacy.gaussian
    monkeypatch.setattr(privacy, "gaussian", lambda values, std: (sums.append(float(values.sum())), values.double())[1])
    runs = {}
    base = open_site_data(site_config(variant="fed_kin"), "gamma")
    other = open_site_data(site_config(data={**site_config().data, "seed": 7}), "gamma")[0]
    for label, data in (("d", base), ("d'", Swapped(base, 1, other))):
        sums.clear()
        site, _ = kin_site(tmp_path / label, mid_checkpoint, data)
        site.run_round(1), site.run_round(2)
        runs[label] = sums[0::2]  # [stem_shift sum, dice_proxy sum] per round
    monkeypatch.setattr(privacy, "gaussian", real)
    assert all(0 < s < 3 * LOG_SHIFT_MAX for s in runs["d"])  # mid-range values: the bound is not trivially met
    assert 0 < abs(runs["d"][0] - runs["d'"][0]) <= LOG_SHIFT_MAX
    assert runs["d"][1] == pytest.approx(runs["d'"][1], abs=1e-9)  # from the frozen source: no carry-over


def test_a_kin_site_sends_only_noised_values_under_its_ledger(tmp_path, mid_checkpoint):
    site, cfg = kin_site(tmp_path / "a", mid_checkpoint)
    again, _ = kin_site(tmp_path / "b", mid_checkpoint)
    outs = [site.run_round(1), site.run_round(2)]
    twin = again.run_round(1)
    sigma = shift_sigma(cfg.noise_multiplier, cfg.metrics_share)
    for o in outs:
        assert set(o["metrics"]) <= KIN_KEYS and "stats" not in o  # one number and the proxy, nothing else
        assert o["privacy"]["dp_noise_std"] == pytest.approx(release_std(sigma, o["metrics"]["stats_images"]))
        audit(RecordDict({"site": ConfigRecord({"name": "gamma", "status": "ok"}), "metrics": MetricRecord(o["metrics"]),
                          "privacy": MetricRecord(o["privacy"])}), "fed_kin")
    assert outs[0]["metrics"]["stem_shift"] != twin["metrics"]["stem_shift"]  # the same images, fresh noise
    assert 0 < outs[-1]["privacy"]["dp_epsilon"] <= cfg.epsilon + 1e-6
    for smuggled in (RecordDict({"metrics": MetricRecord({"align_cos_mean": 0.3})}),  # an exact summary
                     RecordDict({"stats": ArrayRecord({"0.sum": torch.zeros(128)})}),  # statistics
                     RecordDict({"metrics": MetricRecord({"stem_shift_exact": 3.0})})):
        with pytest.raises(ReplyRejected, match="not allowed"):
            audit(smuggled, "fed_kin")


def test_a_lying_site_cannot_plant_kin_evidence(tmp_path):
    kin = FedKin()
    coord = Coordinator(FederationConfig(variant=Variant.fed_kin), [])
    coord.state["privacy"] = {"noise_multiplier": 1.2, "metrics_share": 0.1}  # the run's own, set by federate
    std = release_std(shift_sigma(1.2, 0.1), 6)
    honest = {"dp_released": 1.0, "stats_images": 6, "stem_shift": 5.0, "dp_noise_std": std}
    assert kin.accept(coord, {}, honest) == (5.0, 6, std)
    for lie, match in (({"stem_shift": 1e6}, "outside"),  # far beyond any noisy mean of [0, 8]
                       ({"stem_shift": -50.0}, "outside"),
                       ({"dp_noise_std": std / 100}, "noise std"),  # claims a precision the run's noise never gives
                       ({"stats_images": 0}, "images"), ({"stats_images": 10**7}, "images")):
        with pytest.raises(ValueError, match=match):
            kin.accept(coord, {}, {**honest, **lie})
    with pytest.raises(ValueError, match="needs stem_shift"):
        kin.accept(coord, {}, {k: v for k, v in honest.items() if k != "stem_shift"})
    kin.aggregate(coord, {"a": (5.0, 6, 1.0)})
    assert kin.broadcast(coord, "a", 2, False, False) == ({}, {})  # never a site's own row back
    assert kin.broadcast(coord, "b", 2, False, True)[1]["kin_count"] == [6]  # a newcomer gets the others'
    site, _ = kin_site(tmp_path, _any_checkpoint(tmp_path))
    kin.apply(site, {}, {"kin_mean": [float("nan"), 5.0, 1e9, 5.0, 5.0], "kin_count": [6, 6, 6, 10**9, 6],
                         "kin_std": [1.0, -1.0, 1.0, 1.0, 1.0]})
    assert site.kin == [KinRow(5.0, 6, 1.0)]  # rows no honest coordinator could send are dropped
    with pytest.raises(ValueError, match="length"):
        kin.apply(site, {}, {"kin_mean": [5.0], "kin_count": [], "kin_std": [1.0]})


def _any_checkpoint(tmp_path):
    from tests.conftest import tiny_source

    return tiny_source(tmp_path / "any.pt", shift_reference=1e9)


def test_only_matching_confirmed_evidence_switches_early():
    big = log_shift(400.0)  # a large acquisition shift (threshold 10)
    like = [KinRow(big, 12, 0.8), KinRow(big - 0.3, 12, 0.8)]
    assert confirms(big, like, threshold=10.0)
    assert not confirms(big, [], threshold=10.0)  # no evidence: the site's own warmup decides
    assert not confirms(big, [KinRow(0.5, 12, 0.2)], threshold=10.0)  # sites unlike it: ignored
    assert not confirms(big, [KinRow(big, 12, 3.0)], threshold=10.0)  # too noisy to clear the threshold
    assert not confirms(big, [KinRow(big, 2, 0.8)], threshold=10.0)  # too few images behind it
    assert not confirms(log_shift(5.0), [KinRow(log_shift(5.0), 40, 0.1)], threshold=10.0)  # small shift: stay
    row = accumulate([(4.0, 6, 1.2), (6.0, 6, 1.2)])
    assert row.mean == pytest.approx(5.0) and row.count == 12 and row.std == pytest.approx(1.2 / math.sqrt(2))
