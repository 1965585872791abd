"""Faults a federation meets: a site that dies, a site that sends garbage, unreadable images."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from mlflow.tracking import MlflowClient
from PIL import Image

from client.client_app import app as client_app
from server.federation import federate
from tests.conftest import RecordingGrid, tiny_config


class FaultyApp:
    """The real ClientApp, except that `fault(pid, round, msg, context)` may replace a train reply."""

    def __init__(self, fault) -> None:
        self.fault = fault

    def __call__(self, msg, context):
        if msg.metadata.message_type == "train":
            out = self.fault(int(context.node_config["partition-id"]), int(msg.content["config"]["round"]), msg, context)
            if out is not None:
                return out
        return client_app(msg, context)


def grid_for(app, sites: int = 2) -> RecordingGrid:
    return RecordingGrid(app, [{"partition-id": i, "num-partitions": sites} for i in range(sites)])


def child_runs(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("fedgrata")
    return client, {r.data.tags["fedgrata.site"]: r for r in client.search_runs([exp.experiment_id])
                    if "fedgrata.site" in r.data.tags}


def test_a_site_that_dies_mid_round_rejoins_and_resumes(tmp_path, checkpoint):
    def die(pid, rnd, msg, context):
        if pid == 1 and rnd == 2:
            raise RuntimeError("site process killed")

    cfg = tiny_config(tmp_path, checkpoint, "federation.rounds=3", "data.synthetic_test=6")
    result = federate(grid_for(FaultyApp(die)), cfg, tmp_path)
    gamma, colour = result["sites"]["gamma"], result["sites"]["colour_cast"]
    assert colour["rounds"] == 3 and colour["failures"] == 0 and colour["images"] == 6
    assert gamma["rounds"] == 2 and gamma["failures"] == 1  # round 2 went on without it
    assert gamma["images"] == 4  # rounds 1 and 3: it resumed from its saved state, round 2's chunk is lost
    client, children = child_runs(tmp_path)
    assert "site process killed" in children["gamma"].data.tags["fedgrata.failure.round2"]
    assert [m.step for m in client.get_metric_history(children["gamma"].info.run_id, "reply_failed")] == [2]
    assert [m.step for m in client.get_metric_history(children["gamma"].info.run_id, "dice_proxy")] == [1, 3]


def corrupt(kind):
    """A fault that lets site 1 compute its reply, then spoils it one way."""
    def fault(pid, rnd, msg, context):
        if pid != 1:
            return None
        reply = client_app(msg, context)
        content = reply.content
        if kind == "nan":
            metrics = dict(content["metrics"])
            metrics["dice_proxy"] = math.nan
            content["metrics"] = MetricRecord(metrics)
        elif kind == "inf_array":
            arrays = content["affine"].to_torch_state_dict()
            arrays["0.weight"][0] = math.inf
            content["affine"] = ArrayRecord(arrays)
        elif kind == "wrong_shape":
            arrays = content["affine"].to_torch_state_dict()
            arrays["0.weight"] = torch.ones(3)
            content["affine"] = ArrayRecord(arrays)
        elif kind == "unexpected_key":
            content["images"] = ArrayRecord({"0.raw": torch.zeros(8)})
        elif kind == "image_sized":
            arrays = content["affine"].to_torch_state_dict()
            arrays["0.weight"] = torch.zeros(32 * 32 * 3)
            content["affine"] = ArrayRecord(arrays)
        return Message(content, reply_to=msg)
    return fault


@pytest.mark.parametrize("kind", ["nan", "inf_array", "wrong_shape", "unexpected_key", "image_sized"])
def test_a_bad_reply_is_rejected_logged_and_never_aggregated(tmp_path, checkpoint, kind):
    cfg = tiny_config(tmp_path, checkpoint, "federation=fed_affine")
    grid = grid_for(FaultyApp(corrupt(kind)))
    sent = []
    push = grid.push_messages
    grid.push_messages = lambda messages: push([sent.append(m) or m for m in messages])
    result = federate(grid, cfg, tmp_path)
    assert result["sites"]["gamma"]["failures"] == 2 and result["sites"]["colour_cast"]["failures"] == 0
    # round 2's average is colour_cast's own round-1 parameters: nothing of gamma's went in
    honest = [r for r in grid.replies if r.metadata.src_node_id == 100 and r.metadata.group_id == "1"][0]
    round2 = [m for m in sent if m.metadata.message_type == "train" and m.metadata.group_id == "2"]
    assert round2 and all("affine" in m.content for m in round2)
    averaged = round2[0].content["affine"].to_torch_state_dict()
    for key, value in honest.content["affine"].to_torch_state_dict().items():
        assert torch.equal(averaged[key], value), key
    _, children = child_runs(tmp_path)
    assert {"fedgrata.failure.round1", "fedgrata.failure.round2"} <= set(children["gamma"].data.tags)


def test_corrupt_images_are_skipped_and_counted(tmp_path, checkpoint):
    folder = tmp_path / "site_images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    (folder / "img9.png").write_bytes(b"not a png at all")
    cfg = tiny_config(tmp_path, checkpoint, "data.on_error=skip", "federation.rounds=1", "data.sites=[partner]")
    from client.site import load_source

    node = {"data-root": str(folder), "data-kind": "folder", "site": "partner", "state-dir": str(tmp_path / "state"),
            # a deployed site sets its own privacy limits (client/limits.py)
            "max-epsilon": 8.0, "max-delta": 1e-5, "min-noise-multiplier": 0.0, "min-images": 1,
            "ledger-dir": str(tmp_path / "ledger"), "source-digest": load_source(checkpoint)[2]}
    grid = RecordingGrid(client_app, [node])
    result = federate(grid, cfg, tmp_path)
    metrics = dict(grid.replies[0].content["metrics"])
    assert metrics["images"] == 4 and metrics["skipped"] == 1
    assert result["sites"]["partner"]["images"] == 4
    assert "dice_mean" not in metrics  # an unlabelled partner site: no Dice, only the proxy
    assert (tmp_path / "state" / "site.pt").is_file()  # its state lives where its node config says


def test_an_unreachable_mlflow_does_not_stop_the_federation(tmp_path, checkpoint, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    cfg = tiny_config(tmp_path, checkpoint, "mlflow.tracking_uri=http://127.0.0.1:9")  # nothing listens there
    with pytest.warns(RuntimeWarning, match="127.0.0.1:9"):
        result = federate(grid_for(client_app), cfg, tmp_path)
    assert result["mlflow"]["offline"] and result["mlflow"]["parent_run_id"] is None
    assert result["sites"]["gamma"]["rounds"] == 2  # the federation went on
    journal = [json.loads(line) for line in (Path(result["run_dir"]) / "mlflow_offline.jsonl").read_text().splitlines()]
    rounds = [r for r in journal if r["kind"] == "metrics" and r["site"] == "gamma"]
    assert [r["step"] for r in rounds] == [1, 2] and "dice_proxy" in rounds[0]["metrics"]
    assert journal[0]["kind"] == "start" and journal[-1] == {**journal[-1], "kind": "finish", "status": "FINISHED"}
    assert "unreachable" in capsys.readouterr().out


def test_a_site_stops_releasing_when_its_own_budget_is_spent(tmp_path, checkpoint):
    """The site's ledger (node config ledger-dir, outside the run) remembers a finished run's releases:
    a second run finds the budget spent, so that site releases nothing and says why."""
    cfg = tiny_config(tmp_path, checkpoint, "federation=fed_stats", "federation.rounds=2", "data.synthetic_test=4")
    nodes = [{"partition-id": 0, "num-partitions": 2},
             {"partition-id": 1, "num-partitions": 2, "max-epsilon": 8.0, "ledger-dir": str(tmp_path / "ledger")}]
    federate(RecordingGrid(client_app, nodes), cfg, tmp_path, run_dir=tmp_path / "run1")
    grid = RecordingGrid(client_app, nodes)
    federate(grid, cfg, tmp_path, run_dir=tmp_path / "run2")  # a new run: the simulated site 0 starts afresh
    capped = sorted((r for r in grid.replies if r.metadata.src_node_id == 101), key=lambda r: int(r.metadata.group_id))
    assert [("stats" in r.content) for r in capped] == [False, False]
    assert capped[0].content["site"]["status"] == "budget_exhausted"
    assert capped[0].content["privacy"]["dp_released"] == 0.0
    assert 7.0 < max(r.content["privacy"]["dp_epsilon"] for r in capped) <= 8.0
    other = [r for r in grid.replies if r.metadata.src_node_id == 100]
    assert all("stats" in r.content for r in other)  # its ledger lives in its run folder (simulation)


def test_a_site_error_reaches_the_coordinator_without_the_site_paths(tmp_path, checkpoint, capsys):
    missing = tmp_path / "secret_ward_7" / "images"
    cfg = tiny_config(tmp_path, checkpoint, "data.sites=[partner]")
    grid = RecordingGrid(client_app, [{"data-root": str(missing), "data-kind": "folder", "site": "partner",
                                       "state-dir": str(tmp_path / "state")}])
    with pytest.raises(RuntimeError, match="only 0 of 1 sites answered"):
        federate(grid, cfg, tmp_path)
    out = capsys.readouterr()
    coordinator_view = [line for line in out.out.splitlines() if "could not introduce itself" in line]
    assert coordinator_view and "<path>" in coordinator_view[0]
    assert "secret_ward_7" not in coordinator_view[0] and str(tmp_path) not in coordinator_view[0]
    assert "secret_ward_7" in out.err  # the site's own log keeps the full error


def test_a_stalled_site_is_bounded_by_the_round_timeout(tmp_path, checkpoint):
    import threading
    import time

    release = threading.Event()

    def stall(pid, rnd, msg, context):
        if pid == 1 and rnd == 2:
            release.wait(30)  # hangs until the test lets it go
            return Message(msg.content, reply_to=msg)
        return None

    cfg = tiny_config(tmp_path, checkpoint, "federation.rounds=3", "data.synthetic_test=6",
                      "federation.round_timeout_s=6")
    t0 = time.perf_counter()
    try:
        result = federate(grid_for(FaultyApp(stall)), cfg, tmp_path)
    finally:
        release.set()
    assert result["sites"]["colour_cast"]["rounds"] == 3
    gamma = result["sites"]["gamma"]
    assert gamma["rounds"] == 2 and gamma["failures"] == 1  # round 2 went on without it; it came back in round 3
    _, children = child_runs(tmp_path)
    assert "timeout" in children["gamma"].data.tags["fedgrata.failure.round2"]
    assert time.perf_counter() - t0 < 120


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_real_mlflow_server_receives_the_run_over_http(tmp_path, checkpoint):
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen([str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                               "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
                               "--artifacts-destination", str(tmp_path / "server_artifacts")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.fail("mlflow server did not start")
                time.sleep(0.5)
        uri = f"http://127.0.0.1:{port}"
        cfg = tiny_config(tmp_path, checkpoint, f"mlflow.tracking_uri={uri}", "mlflow.overlays=0")
        result = federate(grid_for(client_app), cfg, tmp_path)
        assert result["mlflow"]["offline"] is None
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("fedgrata").experiment_id])
        assert len(runs) == 3 and {r.data.tags.get("fedgrata.site") for r in runs} == {None, "colour_cast", "gamma"}
        child = next(r for r in runs if r.data.tags.get("fedgrata.site") == "gamma")
        assert [m.step for m in client.get_metric_history(child.info.run_id, "dice_mean")] == [1, 2]
        parent = next(r for r in runs if "fedgrata.site" not in r.data.tags)
        assert "sites.csv" in {a.path for a in client.list_artifacts(parent.info.run_id)}  # artifacts over HTTP too
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_an_interrupted_run_resumes_without_losing_finished_rounds(tmp_path, checkpoint):
    cfg = tiny_config(tmp_path, checkpoint, "federation=fed_stats", "federation.rounds=3", "data.synthetic_test=6")
    run_dir = tmp_path / "runs" / "interrupted"
    grid = grid_for(client_app)
    push = grid.push_messages

    def crash_in_round_3(messages):
        messages = list(messages)
        if any(m.metadata.message_type == "train" and m.metadata.group_id == "3" for m in messages):
            raise KeyboardInterrupt  # the coordinator's process is stopped
        return push(messages)

    grid.push_messages = crash_in_round_3
    with pytest.raises(KeyboardInterrupt):
        federate(grid, cfg, tmp_path, run_dir)
    again = grid_for(client_app)  # a new coordinator process, new node ids
    result = federate(again, load_config_like(cfg, f"resume={run_dir}"), tmp_path, run_dir, resume=True)
    assert sorted(int(r.metadata.group_id) for r in again.replies) == [3, 3]  # only the unfinished round ran
    assert all(site["rounds"] == 3 and site["images"] == 6 for site in result["sites"].values())
    client, children = child_runs(tmp_path)
    parents = [r for r in client.search_runs([client.get_experiment_by_name("fedgrata").experiment_id])
               if "fedgrata.site" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the same MLflow runs went on
    eps = client.get_metric_history(children["gamma"].info.run_id, "dp_epsilon")
    assert [m.step for m in eps] == [1, 2, 3] and eps[-1].value <= 8.0
    with pytest.raises(ValueError, match="another configuration"):
        federate(grid_for(client_app), load_config_like(cfg, "federation.rounds=4"), tmp_path, run_dir, resume=True)


def load_config_like(cfg, *extra):
    """The tiny test configuration with more overrides (as a user reruns with `resume=...`)."""
    tmp = Path(cfg.out_dir).parent
    return tiny_config(tmp, Path(cfg.checkpoint), "federation=fed_stats", "federation.rounds=3",
                       "data.synthetic_test=6", *extra)
