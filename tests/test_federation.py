"""The federation end to end, in process: two tiny synthetic sites, two rounds, every variant."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from client.client_app import app as client_app
from client.site import Site, SiteConfig, load_source, open_site_data
from grata.models import ModelConfig, ResUNet
from server.federation import federate
from wire import audit

from tests.conftest import SIZE, RecordingGrid, run_tiny, tiny_config  # noqa: E402 - shared with test_faults


def test_fed_stats_run_is_recorded_in_mlflow(tmp_path, checkpoint):
    result, grid = run_tiny(tmp_path, checkpoint, "federation=fed_stats")
    assert not any(r.has_error() for r in grid.replies)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])  # site runs live in fedgrata-sites
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 2
    assert parents[0].data.tags["fedgrata.variant"] == "fed_stats"
    assert parents[0].data.params["federation.variant"] == "fed_stats"
    assert parents[0].data.params["privacy.epsilon"] == "8.0"
    assert sorted(c.data.tags["fedgrata.site"] for c in children) == ["colour_cast", "gamma"]
    for child in children:
        assert child.info.status == "FINISHED"
        for key in ("dice_proxy", "dp_epsilon", "dice_disc", "dice_cup", "dice_mean"):
            history = client.get_metric_history(child.info.run_id, f"round/{key}")
            assert [m.step for m in history] == [1, 2], key
        assert not client.get_metric_history(child.info.run_id, "round/align_cos_mean")  # not sent in the private variant
        eps = [m.value for m in client.get_metric_history(child.info.run_id, "round/dp_epsilon")]
        assert 0 < eps[0] < eps[1] <= 8.0 + 1e-6
        overlays = [a.path for a in client.list_artifacts(child.info.run_id, "overlays")]
        assert overlays and all(p.endswith(".png") for p in overlays)
    parent = parents[0].info.run_id
    assert [m.step for m in client.get_metric_history(parent, "round/dice_proxy")] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(parent)}
    assert {"config.yaml", "sites.csv", "rounds.csv", "rounds.png", "summary.json"} <= artifacts
    assert set(result["sites"]) == {"colour_cast", "gamma"} and result["sites"]["gamma"]["images"] == 4


# What a labelled synthetic site running fedgrata sends each round (README: "What a site sends")
SITE_METRICS = {"images", "skipped", "seconds", "guard_resets", "dice_proxy", "fallback_share",
                "align_cos_mean", "align_cos_std", "align_cos_hist", "align_neg_share", "lr_mean", "entropy",
                "consistency", "dice_disc", "dice_cup", "dice_mean",
                "geo_cropped_share", "geo_zoom"}  # the crop protocol: the default method has the geometry step on
# the private variant: counts, the noised proxy and (evaluation only) Dice; nothing else that depends on the images
METRICS = {"local_only": SITE_METRICS, "fed_affine": SITE_METRICS,
           "fed_stats": {"images", "skipped", "stats_images", "dice_proxy", "dice_disc", "dice_cup", "dice_mean"}}


@pytest.mark.parametrize("variant", ["local_only", "fed_stats", "fed_affine"])
def test_replies_hold_only_the_allowed_records(tmp_path, checkpoint, variant):
    result, grid = run_tiny(tmp_path, checkpoint, f"federation={variant}")
    model = ResUNet(ModelConfig(encoder="resnet18", decoder_width=16))
    channels = [m.num_features for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(grid.replies) == 4  # 2 sites x 2 rounds
    expected = {"local_only": {"site", "metrics"}, "fed_stats": {"site", "metrics", "privacy", "stats"},
                "fed_affine": {"site", "metrics", "affine"}}[variant]
    for reply in grid.replies:
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        assert set(reply.content.keys()) == expected
        # key by key, written out here rather than taken from grata/federation/protocol.py: a key added there (or
        # a value that should not leave a site) must show up as a change to this test
        assert set(reply.content["site"].keys()) == {"name", "status"}
        assert set(reply.content["metrics"].keys()) == METRICS[variant]
        if variant == "fed_stats":
            assert set(reply.content["privacy"].keys()) == {"dp_epsilon", "dp_delta", "dp_noise_std", "dp_proxy_std",
                                                            "dp_released"}
        else:
            assert len(reply.content["metrics"]["align_cos_hist"]) == 10
        for record in reply.content.config_records.values():  # no site paths or secrets in the words either
            assert not any(str(tmp_path) in str(v) or "/" in str(v) for v in record.values())
        for name, record in reply.content.array_records.items():
            for i, (key, array) in enumerate(sorted(record.items(), key=lambda kv: int(kv[0].split(".")[0]))):
                layer = int(key.split(".")[0])
                per = 2 if name == "stats" else 1  # stats: mean and second moment of each channel
                assert tuple(array.shape) == (per * channels[layer],)  # per channel, nothing image-sized
                assert array.numpy().size < 3 * SIZE * SIZE
    audited = json.loads((Path(result["run_dir"]) / "audit.json").read_text())  # the run's own audit record
    assert audited["variant"] == variant and len(audited["replies"]) == 4
    for entry in audited["replies"]:
        assert {item["record"] for item in entry["items"]} == expected
        assert entry["bytes"] == sum(item["bytes"] for item in entry["items"]) > 0


def test_audit_rejects_what_may_not_leave(tmp_path, checkpoint):
    from flwr.app import ArrayRecord, MetricRecord, RecordDict

    image = RecordDict({"stats": ArrayRecord({"0.sum": torch.zeros(3, SIZE, SIZE)})})
    with pytest.raises(ValueError, match="per-channel"):
        audit(image, "fed_stats")
    with pytest.raises(ValueError, match="not allowed"):
        audit(RecordDict({"stats": ArrayRecord({"0.sum": torch.zeros(8)})}), "local_only")
    with pytest.raises(ValueError, match="not allowed"):
        audit(RecordDict({"metrics": MetricRecord({"patient_id": 1.0})}), "local_only")
    with pytest.raises(ValueError, match="finite"):
        audit(RecordDict({"metrics": MetricRecord({"dice_proxy": float("nan")})}), "local_only")


def test_site_state_survives_a_new_process(tmp_path, checkpoint):
    """Two rounds with one Site object == two rounds each with a fresh Site (a new ClientApp process)."""
    cfg = tiny_config(tmp_path, checkpoint)
    site_cfg = SiteConfig(data={**cfg.data.__dict__, "sites": ["gamma"]}, adapter=cfg.method.adapter,
                          options=dict(cfg.method.options), variant="fed_stats", rounds=2, noise_multiplier=1.0,
                          overlays=0)
    dataset = open_site_data(site_cfg, "gamma")
    same = Site("gamma", dataset, tmp_path / "a", site_cfg, checkpoint)
    out_same = [same.run_round(1), same.run_round(2)]
    out_fresh = [Site("gamma", dataset, tmp_path / "b", site_cfg, checkpoint).run_round(r) for r in (1, 2)]
    for a, b in zip(out_same, out_fresh):
        for key in ("dice_mean",):  # the proxy leaves noised: fresh noise in every process, by design
            assert a["metrics"][key] == pytest.approx(b["metrics"][key], abs=1e-6)
        assert a["privacy"]["dp_epsilon"] == pytest.approx(b["privacy"]["dp_epsilon"])  # the accountant persisted
        assert a["metrics"]["stats_images"] == b["metrics"]["stats_images"] == 2
    again = Site("gamma", dataset, tmp_path / "b", site_cfg, checkpoint).run_round(2)  # asked again: same answer
    assert again["metrics"] == out_fresh[1]["metrics"] and all(torch.equal(again["stats"][k], out_fresh[1]["stats"][k]) for k in out_fresh[1]["stats"])
    with pytest.raises(RuntimeError, match="already done"):
        Site("gamma", dataset, tmp_path / "b", site_cfg, checkpoint).run_round(1)


def test_reset_order_returns_the_site_to_the_source_model(tmp_path, checkpoint):
    cfg = tiny_config(tmp_path, checkpoint)
    site_cfg = SiteConfig(data=dict(cfg.data.__dict__), adapter="grata",
                          options={"lr": 1e-2, "bn": "source"}, rounds=2, overlays=0)
    site = Site("gamma", open_site_data(site_cfg, "gamma"), tmp_path / "s", site_cfg, checkpoint)
    source = [p.detach().clone() for p in site.adapter.params]
    site.run_round(1)
    assert any(not torch.equal(p, q) for p, q in zip(site.adapter.params, source))
    site.save()
    again = Site("gamma", site.dataset, tmp_path / "s", site_cfg, checkpoint)
    again.reset_to_source()
    assert all(torch.equal(p, q) for p, q in zip(again.adapter.params, source))
    assert again.state.resets == 1


def test_model_is_sent_once_to_a_site_without_it(tmp_path, checkpoint):
    """A site with no access to the coordinator's file gets the weights in its first round only."""
    cfg = tiny_config(tmp_path, checkpoint)
    cfg.checkpoint = str(checkpoint)
    grid = RecordingGrid(client_app, [{"partition-id": 0, "num-partitions": 1}])
    sent = []
    original = grid.push_messages

    def spy(messages):
        messages = list(messages)
        sent.extend(m for m in messages if m.metadata.message_type == "train")
        return original(messages)

    grid.push_messages = spy
    cfg.data.sites = ["gamma"]
    import client.client_app as ca
    real = ca.find_model
    ca.find_model = lambda state_dir, context, config: real(state_dir, context, {**dict(config), "model_hint": ""})
    try:
        federate(grid, cfg, tmp_path)
    finally:
        ca.find_model = real
    assert ["model" in m.content for m in sent] == [True, False]
    assert (Path(json.loads(str(sent[0].content["config"]["site_config"]))["state_root"]) / "gamma" / "source_model.pt").is_file()


def test_compare_runs_every_variant_on_the_same_sites(tmp_path, checkpoint):
    from simulations.compare import compare

    cfg = tiny_config(tmp_path, checkpoint, "mlflow.overlays=0")
    results = compare(cfg, tmp_path)
    assert list(results) == ["local_only", "fed_stats", "fed_affine", "fed_kin"]  # every registered variant
    for res in results.values():
        assert set(res["sites"]) == {"colour_cast", "gamma"}
    # the same sites and seed: before anything is shared (round 1), every variant sees the same Dice
    first = []
    for res in results.values():
        with (Path(res["run_dir"]) / "rounds.csv").open() as fh:  # csv: list-valued cells hold commas
            first.append([r["dice_mean"] for r in csv.DictReader(fh) if r["round"] == "1"])
    assert first[0] == first[1] == first[2]
    out = next(tmp_path.glob("runs/compare-*"))
    table = (out / "compare.txt").read_text()
    assert all(v in table for v in results)
    assert (out / "compare.png").is_file() and (out / "compare.csv").is_file()


def test_a_site_leaves_the_global_rng_alone(tmp_path, checkpoint):
    """Sites run side by side in threads (a round with a timeout): a site that seeded or drew from torch's
    global generator would make its neighbours' draws depend on thread timing."""
    cfg = tiny_config(tmp_path, checkpoint)
    site_cfg = SiteConfig(data={**cfg.data.__dict__, "sites": ["gamma"]}, adapter=cfg.method.adapter,
                          options=dict(cfg.method.options), variant="fed_stats", rounds=2, seed=7, overlays=0)
    load_source(checkpoint)  # a process's first load builds the model (random init, then overwritten): once
    torch.manual_seed(123)
    before = torch.get_rng_state()
    site = Site("gamma", open_site_data(site_cfg, "gamma"), tmp_path / "s", site_cfg, checkpoint)
    site.run_round(1)
    assert torch.equal(torch.get_rng_state(), before)
