"""One test per finding of the privacy audit (issue 11), each played as the attacker would play it
against the defence now in place: an honest-but-curious coordinator and a lying site."""
from __future__ import annotations

import json
import math
import os
import pickle
import random
import stat

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

import grata.privacy as privacy
from client.limits import LimitRefused, SiteLimits
from grata.federation.protocol import MAX_REPLY_BYTES, ReplyRejected
from client.site import Site, SiteConfig, open_site_data
from grata.data import Sample
from grata.privacy import PrivateMoments
from server.config import FederationConfig, Variant
from server.coordinator import Coordinator
from wire import audit

SIZE = 64  # the deepest ResNet stage is 2 x 2: image statistics exist in every layer
# the recommended method with everything that couples images switched on: adaptation with Adam, bn=auto
# (switching, see the checkpoint's tiny shift reference), the drift guard from the first image on
OPTIONS = {"lr": 5e-2, "aux": "ent", "pse": "consis", "bn": "auto", "dynamic_lr": True, "entropy_form": "reference",
           "ensemble": True, "guard": 5.0, "guard_warmup": 2, "auto_warmup": 1, "fallback": True}


@pytest.fixture(scope="module")
def switching_checkpoint(tmp_path_factory):
    from tests.conftest import tiny_source

    # bn=auto switches to image statistics at once
    return tiny_source(tmp_path_factory.mktemp("ckpt") / "source.pt", shift_reference=1e-9)


def site_config(**kw) -> SiteConfig:
    data = {"kind": "synthetic", "root": "", "size": SIZE, "sites": ["gamma"], "synthetic_test": 6, "seed": 0}
    base = dict(data=data, adapter="grata", options=dict(OPTIONS), variant="fed_stats", rounds=2, overlays=0,
                clip=1.0, noise_multiplier=1.0, epsilon=8.0, delta=1e-5, min_images=3)
    return SiteConfig(**{**base, **kw})


def limits(tmp_path, **kw) -> SiteLimits:
    base = dict(max_epsilon=8.0, max_delta=1e-5, min_noise_multiplier=0.5, min_images=3, ledger_dir=tmp_path / "ledger")
    return SiteLimits(**{**base, **kw})


class Swapped:
    """A site's stream with image `index` replaced by another image: the neighbouring data set."""

    def __init__(self, dataset, index: int, other: Sample) -> None:
        self.dataset, self.index, self.other = dataset, index, other

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Sample:
        return self.other if i == self.index else self.dataset[i]


# --- finding 1: the noise could be regenerated from a 32-bit torch seed ------------------------------
def test_noise_cannot_be_reproduced_from_any_seed_the_coordinator_knows(monkeypatch):
    refs = [(torch.zeros(4), torch.ones(4))]
    x = [(torch.zeros(1, 4), torch.ones(1, 4))]

    def forbidden(*a, **k):
        raise AssertionError("privacy noise must not come from torch's or numpy's generators")

    draws = []
    for _ in range(2):  # the same seeds everywhere the coordinator could know or set them
        torch.manual_seed(0), np.random.seed(0), random.seed(0)
        with monkeypatch.context() as m:
            for name in ("randn", "normal", "randn_like", "rand"):
                m.setattr(torch, name, forbidden)
            m.setattr(np.random, "normal", forbidden)
            m.setattr(np.random, "standard_normal", forbidden)
            p = PrivateMoments(refs, clip=1.0, noise_multiplier=1.0)
            p.add(x)
            draws.append(p.release()[0][0])
    assert not torch.equal(draws[0], draws[1])  # same seeds, different noise: nothing seedable produced it
    for seed in (0, 1, 2**32 - 1):  # and it is not torch's stream for any of the obvious seeds
        g = torch.Generator().manual_seed(seed)
        assert not torch.allclose(draws[0], 2.0 * torch.randn(8, generator=g), atol=1e-3)
    src = (privacy.__file__, __import__("client.site", fromlist=["x"]).__file__)
    for path in src:
        text = open(path).read()
        assert "torch.Generator" not in text and "secrets.randbits" not in text, path


# --- finding 2: the release depended on other images and on the adaptation state --------------------
def test_replacing_one_image_moves_the_release_by_at_most_its_sensitivity(tmp_path, switching_checkpoint, monkeypatch):
    """One image replaced in round 1: round 1's pre-noise sum moves by <= 2 clip, round 2's (same
    images) not at all, though adaptation, bn=auto, the guard and Adam all carried the change over."""
    clean: list[list[torch.Tensor]] = []
    monkeypatch.setattr(privacy, "gaussian", lambda values, std: (clean.append(values.clone()), values)[1].double())
    cfg = site_config()
    base = open_site_data(cfg, "gamma")
    other = open_site_data(site_config(data={**cfg.data, "seed": 7}), "gamma")[0]
    runs = {}
    for label, data in (("d", base), ("d'", Swapped(base, 1, other))):
        clean.clear()
        site = Site("gamma", data, tmp_path / label, cfg, switching_checkpoint, limits=limits(tmp_path / label))
        outs = [site.run_round(1), site.run_round(2)]
        assert site.adapter.auto_switched and site.adapter.images_seen == 6
        runs[label] = (clean[0::2], [o["metrics"]["dice_proxy"] for o in outs], site)
    (stats_d, proxy_d, site_d), (stats_e, proxy_e, site_e) = runs["d"], runs["d'"]
    moved = [float((a - b).norm()) for a, b in zip(stats_d, stats_e)]
    assert 0 < moved[0] <= 2 * cfg.clip + 1e-6  # the stated sensitivity of the BN release
    assert moved[1] == pytest.approx(0.0, abs=1e-9)  # round 2 did not change: nothing carried over into it
    # the adapted models did differ (so the old release, taken from them, moved in round 2 too)
    assert any(not torch.equal(p, q) for p, q in zip(site_d.adapter.params, site_e.adapter.params))
    # the proxy's mean depends on every earlier image: its stated sensitivity is the whole range
    assert all(abs(a - b) <= 100.0 for a, b in zip(proxy_d, proxy_e))


# --- finding 3: everything else left without noise ---------------------------------------------------
def test_a_private_site_sends_only_noised_values_and_chunks_its_own_stream(tmp_path, checkpoint):
    cfg = site_config(rounds=6, options={"lr": 1e-3, "bn": "image"})  # the coordinator asks for 1 image a round
    lim = limits(tmp_path, report_dice=False)
    site = Site("gamma", open_site_data(cfg, "gamma"), tmp_path / "s", cfg, checkpoint, limits=lim)
    outs = [site.run_round(r) for r in range(1, 7)]
    released = [o for o in outs if "stats" in o]
    assert len(released) == 2 and all(o["metrics"]["stats_images"] >= 3 for o in released)  # min-images holds
    assert all(o["metrics"]["images"] == 0 for o in outs[2:])  # the site's chunking, not the coordinator's
    for o in outs:
        assert set(o["metrics"]) <= {"images", "skipped", "stats_images", "dice_proxy"}  # no summary, timing, Dice
        reply = RecordDict({"site": ConfigRecord({"name": "gamma", "status": o.get("status", "ok")}),
                            "metrics": MetricRecord(o["metrics"]), "privacy": MetricRecord(o["privacy"])})
        audit(reply, "fed_stats")
    for o in released:  # the proxy's mean carries noise calibrated to the full range (stream-dependent)
        sigma_proxy = cfg.noise_multiplier / math.sqrt(cfg.metrics_share)
        assert o["privacy"]["dp_proxy_std"] == pytest.approx(sigma_proxy * 100.0)
    with pytest.raises(ReplyRejected, match="not allowed"):  # and the audit refuses the summary in fed_stats
        audit(RecordDict({"metrics": MetricRecord({"align_cos_mean": 0.1})}), "fed_stats")


# --- finding 4: the coordinator chose the privacy parameters; wiping the run reset the budget --------
def test_the_site_sets_its_limits_and_its_ledger_outlives_the_run(tmp_path, checkpoint):
    lim = limits(tmp_path, max_epsilon=4.0, max_delta=1e-5, min_noise_multiplier=1.0)
    for asked, what in ((dict(epsilon=8.0), "max-epsilon"), (dict(delta=0.5), "max-delta"),
                        (dict(noise_multiplier=0.4), "min-noise-multiplier")):
        with pytest.raises(LimitRefused, match=what):
            lim.check(site_config(**{"epsilon": 4.0, "noise_multiplier": 1.0, **asked}))
    with pytest.raises(ValueError, match="missing"):  # a deployed site without its own limits does not start
        SiteLimits.from_node({"domain": "gamma"}, True, site_config(), tmp_path)
    lim = limits(tmp_path, max_epsilon=6.0, min_noise_multiplier=0.5)
    sigma = privacy.calibrate(6.0, 1e-5, releases=2)  # one run of 2 rounds spends the whole budget
    cfg = site_config(epsilon=6.0, noise_multiplier=sigma, rounds=2, options={"lr": 1e-3, "bn": "image"})
    data = open_site_data(cfg, "gamma")
    first = [Site("gamma", data, tmp_path / "run1", cfg, checkpoint, limits=lim).run_round(r) for r in (1, 2)]
    spent = first[-1]["privacy"]["dp_epsilon"]
    assert all("stats" in o for o in first) and 0 < spent <= 6.0
    # the operator wipes the run folder and joins a new run: the ledger (keyed to the data) remembers
    second = Site("gamma", data, tmp_path / "run2", cfg, checkpoint, limits=lim).run_round(1)
    assert "stats" not in second and second["status"] == "budget_exhausted"
    assert second["privacy"]["dp_epsilon"] == pytest.approx(spent)


# --- finding 5: one lying site poisoned every site ---------------------------------------------------
def test_a_lying_site_is_refused_or_bounded(tmp_path, checkpoint):
    with pytest.raises(ReplyRejected, match="count"):
        audit(RecordDict({"metrics": MetricRecord({"images": 10**6, "stats_images": 10**6})}), "fed_stats")
    cfg = site_config(variant="fed_affine", options={"lr": 1e-3, "bn": "image"})
    site = Site("gamma", open_site_data(cfg, "gamma"), tmp_path / "s", cfg, checkpoint, limits=limits(tmp_path))
    refs = site.refs
    # pooled statistics at +5 source sigma in every layer: clipped to what honest pooling can produce
    poison = [(mu + 5 * torch.sqrt(var), (mu + 5 * torch.sqrt(var)) ** 2 + var) for mu, var in refs]
    site.set_pooled(poison, 1.0)
    bound = cfg.clip / math.sqrt(len(refs))
    for layer, ref in zip(site.adapter.norms, refs):
        z = privacy.to_relative(layer.pooled_m1[None], layer.pooled_m2[None], ref)[0]
        assert z.norm() <= bound * 1.01
    assert site.adapter.pooled_weight <= site.limits.max_pooled_weight  # the coordinator asked for 1.0
    # averaged affine parameters of 100: clipped to within max-affine-shift of the source's
    site.set_affine([(torch.full_like(n.weight, 100.0), torch.full_like(n.bias, -100.0)) for n in site.adapter.norms])
    for (name, layer) in site._norm_names():
        w0 = site.adapter.source_state[f"{name}.weight"]
        assert (layer.weight - w0).abs().max() <= site.limits.max_affine_shift + 1e-6
    # with the median across sites one liar cannot move the average affine parameters far
    coord = Coordinator(FederationConfig(variant=Variant.fed_affine, aggregation="median"), refs)
    honest = [(torch.ones_like(mu), torch.zeros_like(mu)) for mu, _ in refs]
    liar = [(torch.full_like(mu, 1e3), torch.full_like(mu, 1e3)) for mu, _ in refs]
    coord.end_round({"a": (honest, 10.0), "b": (honest, 10.0), "liar": (liar, 1e5)})
    assert torch.allclose(coord.state["affine"][0][0], torch.ones_like(refs[0][0]))
    # a model whose digest the node config did not pin is refused, whatever the coordinator says
    with pytest.raises(LimitRefused, match="pinned"):
        Site("gamma", site.dataset, tmp_path / "t", cfg, checkpoint, limits=limits(tmp_path, source_digest="0" * 64))


# --- finding 6: the reply audit bounded shapes, not volume --------------------------------------------
def test_an_oversized_or_smuggling_reply_is_refused():
    channels = [64] * 4
    smuggle = RecordDict({"stats": ArrayRecord({f"{i}.sum": torch.zeros(1024) for i in range(192)})})
    with pytest.raises(ReplyRejected):
        audit(smuggle, "fed_stats", channels)
    with pytest.raises(ReplyRejected, match="bytes"):  # even with no model layout to compare with
        audit(smuggle, "fed_stats")
    with pytest.raises(ReplyRejected, match="one number"):  # an image as a list in a scalar field
        audit(RecordDict({"metrics": MetricRecord({"entropy": [0.5] * 4096})}), "local_only")
    with pytest.raises(ReplyRejected, match="site.status"):
        audit(RecordDict({"site": ConfigRecord({"name": "north", "status": "x" * 100_000})}), "local_only")
    with pytest.raises(ReplyRejected, match="layer"):
        audit(RecordDict({"stats": ArrayRecord({"0.sum": torch.zeros(2 * 64), "1.sum": torch.zeros(2 * 32)})}),
              "fed_stats", channels)
    ok = RecordDict({"stats": ArrayRecord({f"{i}.sum": torch.zeros(128) for i in range(4)})})
    assert sum(i["bytes"] for i in audit(ok, "fed_stats", channels)) < MAX_REPLY_BYTES


# --- finding 7: deployment -------------------------------------------------------------------------
class Evil:
    def __reduce__(self):
        return (os.system, ("true",))


def test_deployment_keys_state_and_errors(tmp_path, checkpoint, monkeypatch):
    from client.client_app import redact
    from server import certs

    out = certs.make_all(tmp_path / "coord")
    assert not list(out.glob("node*.key"))  # the coordinator makes no site's private key
    old = os.umask(0)  # even with a permissive umask the key is never readable by others
    try:
        monkeypatch.setattr(os, "chmod", lambda *a, **k: pytest.fail("keys are created 0600, not chmod'ed after"))
        pub = certs.make_site_key(tmp_path / "site", "north")
    finally:
        os.umask(old)
    key = tmp_path / "site" / "north.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and pub.read_text().startswith("ecdsa-sha2-nistp384")
    assert "PRIVATE" not in pub.read_text()
    # a state file that would run code when unpickled is refused (weights_only)
    cfg = site_config(variant="local_only", options={"lr": 1e-3, "bn": "image"})
    state = tmp_path / "s"
    state.mkdir()
    torch.save({"adapter": Evil()}, state / "site.pt", pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(RuntimeError, match="cannot read its state"):
        Site("gamma", open_site_data(cfg, "gamma"), state, cfg, checkpoint, limits=limits(tmp_path))
    # a path with spaces leaks nothing after its first space
    assert "ward" not in redact("FileNotFoundError: '/data/secret ward 7/img 1.png'")
    assert "ward" not in redact("cannot decode /data/secret ward 7/img 1.png: truncated")
    # the SuperLink of the loopback deployment listens on loopback only (Control API shares its port)
    from simulations.deploy_local import Deployment

    started = {}
    monkeypatch.setattr(Deployment, "_start", lambda self, name, args: started.setdefault(name, args))
    monkeypatch.setattr(Deployment, "wait_for", staticmethod(lambda *a, **k: None))
    monkeypatch.setattr(Deployment, "listening", lambda self, proc, timeout=60: True)
    dep = Deployment(tmp_path / "dep")
    dep.start_superlink(nodes=1)
    args = started["superlink"]
    assert args[args.index("--host") + 1] == "127.0.0.1"


# --- a lying coordinator: the approved weights with another quality model or crop reference -----------
def test_a_site_pins_the_metadata_it_acts_on_not_only_the_weights(tmp_path, checkpoint):
    """The quality model decides fallbacks and the geometry reference decides crops: a coordinator that
    keeps the approved weights but swaps either is refused by a site that pinned its source digest."""
    from grata.federation.siteconfig import load_source, source_digest
    from grata.models import load_checkpoint, save_checkpoint
    from grata.quality import QualityModel

    cfg = site_config(variant="local_only", options={"lr": 1e-3, "bn": "source"})
    data = open_site_data(cfg, "gamma")
    model, meta, pinned = load_source(checkpoint)
    Site("gamma", data, tmp_path / "ok", cfg, checkpoint, limits=limits(tmp_path, source_digest=pinned))  # approved
    weights, full = load_checkpoint(checkpoint)
    swaps = {"quality": {**full, "quality": QualityModel.constant(99.0).to_dict()},
             "geometry": {**full, "geometry": {"disc_share": 0.05, "detector_gain": 1.0}},
             "shift_reference": {**full, "shift_reference": 1e-9}}
    for what, swapped in swaps.items():
        path = tmp_path / f"{what}.pt"
        save_checkpoint(path, weights, **swapped)
        assert load_source(path)[0].state_dict().keys() == model.state_dict().keys()
        with pytest.raises(LimitRefused, match="pinned"):
            Site("gamma", data, tmp_path / what, cfg, path, limits=limits(tmp_path, source_digest=pinned))
    # the metadata as it travels (JSON in the train message, saved by the site) keeps the digest
    travelled = {"shift_reference": float(meta["shift_reference"]), "quality": json.loads(json.dumps(meta["quality"])),
                 "geometry": json.loads(json.dumps(meta.get("geometry") or {}))}
    assert source_digest(model, travelled) == pinned


# --- a curious coordinator: model_hint as a probe for files at a site ---------------------------------------
def test_model_hint_does_not_tell_the_coordinator_whether_a_file_exists(tmp_path, checkpoint):
    """The coordinator names `model_hint`; a site answers the same (no model found, no error) whether that
    path is missing, a patient file that is no checkpoint, or a folder."""
    from flwr.app import Context, RecordDict as Records

    from client.client_app import find_model
    from grata.federation.siteconfig import load_source

    secret = tmp_path / "ward7" / "patient_0042.png"
    secret.parent.mkdir()
    secret.write_bytes(b"\x89PNG not a checkpoint")
    context = Context(run_id=1, node_id=1, node_config={}, state=Records(), run_config={})
    digest = load_source(checkpoint)[2]
    answers = [find_model(tmp_path / "state", context, {"model_digest": digest, "model_hint": str(hint)})
               for hint in (tmp_path / "missing.pt", secret, secret.parent)]
    assert answers == [None, None, None]
    assert find_model(tmp_path / "state", context, {"model_digest": digest, "model_hint": str(checkpoint)}) == checkpoint
