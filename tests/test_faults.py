"""Faults a federation meets: a site that dies, a site that sends garbage, unreadable images."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord
from mlflow.tracking import MlflowClient
from PIL import Image

import client.site as site_module
from client.client_app import app as client_app
from client.site import Site, SiteConfig, open_site_data
from server.federation import federate
from tests.conftest import RecordingGrid, partner_node, tiny_config


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


def grid_for(app, sites: int = 2, first_id: int = 100, order=None, **kw) -> RecordingGrid:
    """A grid of `sites` simulated sites; `first_id`/`order` give other node ids and another order of the
    partitions, as a restarted coordinator meets them (Flower gives nodes new ids)."""
    grid = RecordingGrid(app, [{"partition-id": i, "num-partitions": sites} for i in (order or range(sites))], **kw)
    grid.contexts = {first_id + i: Context(run_id=c.run_id, node_id=first_id + i, node_config=c.node_config,
                                           state=c.state, run_config=c.run_config)
                     for i, c in enumerate(grid.contexts.values())}
    return grid


class ManualClock:
    """The time a round timeout sees: it only moves when the test moves it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def reply_of(grid, site_pid: int, rnd: int, first_id: int = 100):
    return next(r for r in grid.replies if r.metadata.src_node_id == first_id + site_pid and r.metadata.group_id == str(rnd))


def site_config_of(msg) -> SiteConfig:
    return SiteConfig(**json.loads(str(msg.content["config"]["site_config"])))


def child_runs(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    return client, {r.data.tags["fedgrata.site"]: r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
                    if "fedgrata.site" in r.data.tags}


ROUND_KEYS = ("dice_proxy", "align_cos_mean", "entropy", "consistency", "dice_mean")


def test_a_site_that_dies_mid_round_rejoins_and_resumes(tmp_path, checkpoint, monkeypatch):
    """Site 1 dies in round 2 after adapting 2 of its 3 images (its adapter moved, nothing saved). In
    round 3 it must go on from its saved round-1 state: not from the source model, not from the
    half-adapted state it died with."""
    real_stream, seen, messages = site_module.stream, [], {}

    def die(pid, rnd, msg, context):
        messages[(pid, rnd)] = msg
        if pid == 1 and rnd == 2:
            def dying_stream(*args, **kw):
                for sample in real_stream(*args, **kw):
                    if len(seen) == 2:
                        raise RuntimeError("site process killed")
                    seen.append(sample)
                    yield sample
            monkeypatch.setattr(site_module, "stream", dying_stream)  # the inline grid runs sites in turn
            try:
                return client_app(msg, context)
            finally:
                monkeypatch.setattr(site_module, "stream", real_stream)

    cfg = tiny_config(tmp_path, checkpoint, "federation.rounds=3", "data.synthetic_test=9")
    grid = grid_for(FaultyApp(die))
    result = federate(grid, cfg, tmp_path)
    assert len(seen) == 2  # it did die mid-chunk, with work done
    gamma, colour = result["sites"]["gamma"], result["sites"]["colour_cast"]
    assert colour["rounds"] == 3 and colour["failures"] == 0 and colour["images"] == 9
    assert gamma["rounds"] == 2 and gamma["failures"] == 1 and gamma["images"] == 6  # round 2's chunk is lost
    client, children = child_runs(tmp_path)
    assert "site process killed" in children["gamma"].data.tags["fedgrata.failure.round2"]
    assert [m.step for m in client.get_metric_history(children["gamma"].info.run_id, "round/reply_failed")] == [2]
    assert [m.step for m in client.get_metric_history(children["gamma"].info.run_id, "round/dice_proxy")] == [1, 3]

    # what round 3 should be: round 1, then round 3, by a site that never died ...
    site_cfg = site_config_of(messages[(1, 3)])
    data = open_site_data(site_cfg, "gamma")
    Site("gamma", data, tmp_path / "ref", site_cfg, checkpoint).run_round(1)
    expected = Site("gamma", data, tmp_path / "ref", site_cfg, checkpoint).run_round(3)["metrics"]
    from_source = Site("gamma", data, tmp_path / "src", site_cfg, checkpoint).run_round(3)["metrics"]
    got = dict(reply_of(grid, 1, 3).content["metrics"])
    for key in ROUND_KEYS:
        assert got[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key
    # ... which a restart from the source model would not give (so the check above can tell them apart)
    assert any(from_source[k] != pytest.approx(expected[k], rel=1e-6, abs=1e-9) for k in ROUND_KEYS)


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
    node = partner_node(tmp_path, folder, checkpoint)
    grid = RecordingGrid(client_app, [node])
    result = federate(grid, cfg, tmp_path)
    metrics = dict(grid.replies[0].content["metrics"])
    assert metrics["images"] == 4 and metrics["skipped"] == 1
    assert result["sites"]["partner"]["images"] == 4
    assert "dice_mean" not in metrics  # an unlabelled partner site: no Dice, only the proxy
    assert (tmp_path / "state" / "site.pt").is_file()  # its state lives where its node config says


class Unavailable:
    """An HTTP endpoint on a port it binds itself that answers every request 503 and counts them."""

    def __init__(self) -> None:
        import http.server
        import threading

        outer = self
        self.requests = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                outer.requests += 1
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _answer

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_an_unreachable_mlflow_does_not_stop_the_federation(tmp_path, checkpoint, monkeypatch, capsys):
    """With the tracker's own retry settings (none set by the test): MLflow's default of 7 retries with
    exponential back-off would take minutes per call; the tracker's must give up after one retry, once."""
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    store = Unavailable()
    try:
        cfg = tiny_config(tmp_path, checkpoint, f"mlflow.tracking_uri={store.uri}")
        with pytest.warns(RuntimeWarning, match=store.uri) as warned:
            result = federate(grid_for(client_app), cfg, tmp_path)
    finally:
        store.close()
    assert store.requests == 2  # the first call and one retry; from then on nothing is sent
    assert len([w for w in warned if "unreachable" in str(w.message)]) == 1  # one warning, not one per record
    assert result["mlflow"]["offline"] and result["mlflow"]["parent_run_id"] is None
    assert result["sites"]["gamma"]["rounds"] == 2  # the federation went on
    journal = [json.loads(line) for line in (Path(result["run_dir"]) / "mlflow_offline.jsonl").read_text().splitlines()]
    records = [r for r in journal if r["kind"] == "metrics" and r["site"] == "gamma"]
    rounds = [r for r in records if "round/dice_proxy" in r["metrics"]]
    assert [r["step"] for r in rounds] == [1, 2]  # the per-round series ...
    assert [r["metrics"]["dice_mean"] for r in records if "dice_mean" in r["metrics"]] == \
        [pytest.approx(result["sites"]["gamma"]["dice_mean"])]  # ... and the stream figure, as MLflow would have had them
    assert journal[0]["kind"] == "start" and journal[-1] == {**journal[-1], "kind": "finish", "status": "FINISHED"}
    assert "unreachable" in capsys.readouterr().out


class StoreClock:
    """What MLflow calls would cost against a store that never answers, on a clock the test owns.

    Each HTTP call to the store advances it by its worst case, (retries + 1) x its timeout (an attempt that
    hangs until the timeout), and by every back-off urllib3 asks to sleep, which is not slept. The
    retries, timeout and back-off are whatever the process's settings give MLflow: the test sets none."""

    def __init__(self, monkeypatch) -> None:
        import mlflow.utils.rest_utils as rest
        from urllib3.util.retry import Retry

        self.seconds, self.calls = 0.0, 0
        real = rest._get_http_response_with_retries

        def call(method, url, max_retries, *args, **kwargs):
            self.calls += 1
            self.seconds += (max_retries + 1) * kwargs["timeout"]
            return real(method, url, max_retries, *args, **kwargs)

        def back_off(retry):
            self.seconds += retry.get_backoff_time()

        monkeypatch.setattr(rest, "_get_http_response_with_retries", call)
        monkeypatch.setattr(Retry, "_sleep_backoff", back_off)


def test_an_unreachable_mlflow_costs_seconds_with_the_default_settings(tmp_path, checkpoint, monkeypatch):
    """Nothing set by the user or the test (no MLFLOW_HTTP_* variable): a store where nothing listens
    costs the federation one call, bounded to seconds, and then no more calls. MLflow's own defaults
    (7 retries, exponential back-off, a 120 s timeout) would allow over 16 minutes for that one call."""
    import socket

    for name in [k for k in os.environ if k.startswith("MLFLOW_HTTP_REQUEST")]:
        monkeypatch.delenv(name)
    held = socket.socket()  # bound, never listening: connections to it are refused
    held.bind(("127.0.0.1", 0))
    clock = StoreClock(monkeypatch)
    try:
        cfg = tiny_config(tmp_path, checkpoint, f"mlflow.tracking_uri=http://127.0.0.1:{held.getsockname()[1]}")
        with pytest.warns(RuntimeWarning, match="unreachable"):
            result = federate(grid_for(client_app), cfg, tmp_path)
    finally:
        held.close()
    assert result["mlflow"]["offline"] and result["sites"]["gamma"]["rounds"] == 2  # it went on, offline
    assert clock.calls == 1  # the first failure sends the records to the journal: no call after it
    assert clock.seconds <= 30  # the worst case of that call: 2 attempts x 10 s, no back-off


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
    """Site 1 does round 2's work (its state is saved), then hangs before its reply leaves. The round
    ends without it when the timeout passes (the test's clock says when, not the machine's load), and
    in round 3 the site goes on from where its own work stopped."""
    import threading

    clock, honest_done, released, messages = ManualClock(), threading.Event(), threading.Event(), {}

    def stall(pid, rnd, msg, context):
        messages[rnd] = msg
        if rnd != 2:
            return None
        if pid == 0:
            try:
                return client_app(msg, context)
            finally:
                honest_done.set()
        reply = client_app(msg, context)
        honest_done.wait(600)  # a safety net only: the honest site's reply is in before time runs out
        clock.now += 1e6  # the round timeout passes while this site hangs
        released.wait(20)  # let go once round 3 starts; a coordinator still waiting would get it late
        return reply

    grid = grid_for(FaultyApp(stall), clock=clock)
    push = grid.push_messages
    grid.push_messages = lambda messages: push([released.set() or m if m.metadata.group_id == "3" else m
                                                for m in messages])
    cfg = tiny_config(tmp_path, checkpoint, "federation.rounds=3", "data.synthetic_test=6",
                      "federation.round_timeout_s=60")
    try:
        result = federate(grid, cfg, tmp_path)
    finally:
        released.set()
    assert result["sites"]["colour_cast"]["rounds"] == 3 and result["sites"]["colour_cast"]["failures"] == 0
    gamma = result["sites"]["gamma"]
    assert gamma["rounds"] == 2 and gamma["failures"] == 1 and gamma["images"] == 4  # round 2 went on without it
    _, children = child_runs(tmp_path)
    assert "timeout" in children["gamma"].data.tags["fedgrata.failure.round2"]
    # the stalled round's work stayed at the site: round 3 is what a site that answered in time sends
    site_cfg = site_config_of(messages[3])
    data = open_site_data(site_cfg, "gamma")
    expected = [Site("gamma", data, tmp_path / "ref", site_cfg, checkpoint).run_round(r) for r in (1, 2, 3)][-1]
    got = dict(reply_of(grid, 1, 3).content["metrics"])
    assert all(got[k] == pytest.approx(expected["metrics"][k], rel=1e-6, abs=1e-9) for k in ROUND_KEYS)


def start_mlflow_server(tmp_path, attempts: int = 3):
    """`mlflow server` on a free port; a port taken between picking and binding costs a retry, not the test."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    mlflow = Path(sys.executable).with_name("mlflow")
    for _ in range(attempts):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen([str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                                   "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
                                   "--artifacts-destination", str(tmp_path / "server_artifacts")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120  # a safety net; the usual start is seconds
        while server.poll() is None and time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                return server, f"http://127.0.0.1:{port}"
            except OSError:
                time.sleep(0.5)
        server.kill()
        server.wait()
    pytest.fail(f"mlflow server did not start in {attempts} attempts")


def stop(server) -> None:
    server.terminate()
    server.wait(timeout=30)


@pytest.mark.slow
def test_a_real_mlflow_server_receives_the_run_over_http_and_may_go_down(tmp_path, checkpoint, monkeypatch):
    server, uri = start_mlflow_server(tmp_path)
    try:
        cfg = tiny_config(tmp_path, checkpoint, f"mlflow.tracking_uri={uri}", "mlflow.overlays=0")
        result = federate(grid_for(client_app), cfg, tmp_path)
        assert result["mlflow"]["offline"] is None
        client = MlflowClient(uri)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert len(runs) == 3 and {r.data.tags.get("fedgrata.site") for r in runs} == {None, "colour_cast", "gamma"}
        child = next(r for r in runs if r.data.tags.get("fedgrata.site") == "gamma")
        assert [m.step for m in client.get_metric_history(child.info.run_id, "round/dice_mean")] == [1, 2]
        parent = next(r for r in runs if "fedgrata.site" not in r.data.tags)
        assert "sites.csv" in {a.path for a in client.list_artifacts(parent.info.run_id)}  # artifacts over HTTP too

        # The same store goes down after the run started: after round 1 was logged, before round 2.
        for name in [k for k in os.environ if k.startswith("MLFLOW_HTTP_REQUEST")]:
            monkeypatch.delenv(name)  # the tracker's own retry bounds, as a user gets them
        grid = grid_for(client_app)
        push = grid.push_messages
        clock = StoreClock(monkeypatch)

        def down_in_round_2(messages):
            messages = list(messages)
            if any(m.metadata.message_type == "train" and m.metadata.group_id == "2" for m in messages):
                stop(server)
                clock.seconds, clock.calls = 0.0, 0  # from here on: what the outage costs
            return push(messages)

        grid.push_messages = down_in_round_2
        cfg = tiny_config(tmp_path, checkpoint, f"mlflow.tracking_uri={uri}", "mlflow.overlays=0",
                          "mlflow.run_name=goes_down")
        with pytest.warns(RuntimeWarning, match="unreachable") as warned:
            result = federate(grid, cfg, tmp_path)
    finally:
        if server.poll() is None:
            stop(server)
    assert len([w for w in warned if "unreachable" in str(w.message)]) == 1
    assert result["sites"]["gamma"]["rounds"] == 2 and result["mlflow"]["offline"]
    assert clock.calls == 1 and clock.seconds <= 30  # the outage cost one call, bounded to seconds (default settings)
    store = MlflowClient(f"sqlite:///{tmp_path}/server.db")  # what reached the server before it went down
    runs = store.search_runs([e.experiment_id for e in store.search_experiments()])
    down = {r.data.tags.get("fedgrata.site"): r for r in runs if r.data.tags.get("mlflow.runName", "").startswith("goes_down")
            or r.data.tags.get("mlflow.parentRunId") == result["mlflow"]["parent_run_id"]}
    assert set(down) == {None, "colour_cast", "gamma"}
    assert [m.step for m in store.get_metric_history(down["gamma"].info.run_id, "round/dice_mean")] == [1]
    assert down[None].info.status == "RUNNING"  # it never heard the end
    journal = [json.loads(line) for line in (Path(result["run_dir"]) / "mlflow_offline.jsonl").read_text().splitlines()]
    # round 2's series, then the stream-level figures (step 0), both kept for the store that went down
    assert [r["step"] for r in journal if r["kind"] == "metrics" and r["site"] == "gamma"] == [2, 0]
    assert journal[-1]["kind"] == "finish" and journal[-1]["status"] == "FINISHED"


def test_an_interrupted_run_resumes_without_losing_finished_rounds(tmp_path, checkpoint, monkeypatch):
    """The worst moment: round 3's replies are in (the sites spent privacy on them) and logged to MLflow,
    and the coordinator dies before its state for round 3 is saved. Resumed by a new coordinator
    process (new node ids, sites in another order), round 3 is asked again: each site must resend the
    same reply (no new release, no new privacy cost) and MLflow must not get step 3 twice."""
    import server.federation as fed

    cfg = tiny_config(tmp_path, checkpoint, "federation=fed_stats", "federation.rounds=3", "data.synthetic_test=6")
    run_dir = tmp_path / "runs" / "interrupted"
    real_save = fed.save_progress

    def die_before_saving_round_3(run_dir, rnd, *args):
        if rnd == 3:
            raise KeyboardInterrupt  # the coordinator's process is stopped
        return real_save(run_dir, rnd, *args)

    monkeypatch.setattr(fed, "save_progress", die_before_saving_round_3)
    grid = grid_for(client_app)
    with pytest.raises(KeyboardInterrupt):
        federate(grid, cfg, tmp_path, run_dir)
    monkeypatch.setattr(fed, "save_progress", real_save)
    first = {reply.content["site"]["name"]: reply for reply in grid.replies if reply.metadata.group_id == "3"}
    assert set(first) == {"colour_cast", "gamma"}  # both sites did round 3 before the crash

    again = grid_for(client_app, first_id=500, order=[1, 0])  # a new coordinator process: other ids and order
    result = federate(again, load_config_like(cfg, f"resume={run_dir}"), tmp_path, run_dir, resume=True)
    assert sorted(int(r.metadata.group_id) for r in again.replies) == [3, 3]  # only the unsaved round ran again
    for reply in again.replies:
        before = first[reply.content["site"]["name"]]
        assert dict(reply.content["metrics"]) == dict(before.content["metrics"])
        assert dict(reply.content["privacy"]) == dict(before.content["privacy"])
        for key, array in reply.content["stats"].to_torch_state_dict().items():  # the same noise: no new release
            assert torch.equal(array, before.content["stats"].to_torch_state_dict()[key]), key
    from opacus.accountants import create_accountant

    for name in ("colour_cast", "gamma"):  # the ledger holds three rounds' releases, not four: what round 3 reported
        (ledger,) = (run_dir / "sites" / name / "ledger").glob("*.json")
        accountant = create_accountant("rdp")
        accountant.history = [tuple(h) for h in json.loads(ledger.read_text())["history"]]
        reported = dict(first[name].content["privacy"])["dp_epsilon"]
        assert accountant.get_epsilon(1e-5) == pytest.approx(reported, rel=1e-9)
    assert all(site["rounds"] == 3 and site["images"] == 6 for site in result["sites"].values())

    client, children = child_runs(tmp_path)
    parents = [r for r in client.search_runs([client.get_experiment_by_name("fedgrata").experiment_id])
               if "fedgrata.site" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the same MLflow runs went on
    assert [m.step for m in client.get_metric_history(parents[0].info.run_id, "round/dice_proxy")] == [1, 2, 3]
    for child in children.values():
        for key in ("round/dice_proxy", "round/dp_epsilon", "round/images"):
            assert [m.step for m in client.get_metric_history(child.info.run_id, key)] == [1, 2, 3], key
    eps = client.get_metric_history(children["gamma"].info.run_id, "round/dp_epsilon")
    assert eps[-1].value <= 8.0
    with pytest.raises(ValueError, match="another configuration"):
        federate(grid_for(client_app), load_config_like(cfg, "federation.rounds=4"), tmp_path, run_dir, resume=True)


def load_config_like(cfg, *extra):
    """The tiny test configuration with more overrides (as a user reruns with `resume=...`)."""
    tmp = Path(cfg.out_dir).parent
    return tiny_config(tmp, Path(cfg.checkpoint), "federation=fed_stats", "federation.rounds=3",
                       "data.synthetic_test=6", *extra)


def test_a_site_refuses_to_send_what_its_own_audit_rejects(tmp_path, checkpoint, monkeypatch, capsys):
    """A bug at the site puts an image into its reply before the site's own audit: the site must fail
    closed (an error reply, no content), not rely on the coordinator to throw it away."""
    import client.client_app as ca

    real = ca.reply_content

    def leaky(name, out):
        content = real(name, out)
        if name == "gamma":
            content["images"] = ArrayRecord({"0.raw": torch.rand(3, 32, 32)})
        return content

    monkeypatch.setattr(ca, "reply_content", leaky)
    cfg = tiny_config(tmp_path, checkpoint, "federation=fed_affine")
    grid = grid_for(client_app)
    result = federate(grid, cfg, tmp_path)
    leaked = [r for r in grid.replies if r.metadata.src_node_id == 101]
    assert len(leaked) == 2
    for reply in leaked:  # what left the site: an error with no records at all
        assert reply.has_error() and not reply.has_content()
        assert "not allowed" in reply.error.reason and "images" in reply.error.reason
    assert all(not r.has_error() for r in grid.replies if r.metadata.src_node_id == 100)
    assert result["sites"]["gamma"]["failures"] == 2 and result["sites"]["colour_cast"]["failures"] == 0
    audited = json.loads((Path(result["run_dir"]) / "audit.json").read_text())
    assert {e["site"] for e in audited["replies"]} == {"colour_cast"}


def test_a_flagged_site_is_reset_and_left_out_of_the_average(tmp_path, checkpoint):
    """fed_affine, three rounds. Site 1 reports a proxy that fell 50 points in round 2: the coordinator
    flags it, averages round 2 without its parameters, orders it back to the source model in round 3,
    and the site does start round 3 from the source model."""
    def drop(pid, rnd, msg, context):
        if pid != 1 or rnd != 2:
            return None
        reply = client_app(msg, context)
        metrics = dict(reply.content["metrics"])
        metrics["dice_proxy"] -= 50.0
        reply.content["metrics"] = MetricRecord(metrics)
        return Message(reply.content, reply_to=msg)

    cfg = tiny_config(tmp_path, checkpoint, "federation=fed_affine", "federation.rounds=3", "data.synthetic_test=6",
                      "federation.reset_on_drop=true")
    grid = grid_for(FaultyApp(drop))
    sent = []
    push = grid.push_messages
    grid.push_messages = lambda messages: push([sent.append(m) or m for m in messages])
    result = federate(grid, cfg, tmp_path)
    gamma = result["sites"]["gamma"]
    assert gamma["flagged"] == 1 and gamma["resets"] == 1 and gamma["failures"] == 0
    assert result["sites"]["colour_cast"]["flagged"] == 0

    def train_to(nid, rnd):
        return next(m for m in sent if m.metadata.message_type == "train" and m.metadata.dst_node_id == nid
                    and m.metadata.group_id == str(rnd))

    def affine(record):
        return record["affine"].to_torch_state_dict()

    # round 2 went out with both sites' round-1 parameters averaged (equal image counts) ...
    both = [affine(reply_of(grid, pid, 1).content) for pid in (0, 1)]
    for key, value in affine(train_to(100, 2).content).items():
        torch.testing.assert_close(value, (both[0][key] + both[1][key]) / 2, rtol=0, atol=1e-6)
    # ... round 3 with colour_cast's round-2 parameters alone: the flagged site's were left out
    own = affine(reply_of(grid, 0, 2).content)
    for key, value in affine(train_to(100, 3).content).items():
        assert torch.equal(value, own[key]), key
    order = train_to(101, 3)
    assert order.content["config"]["reset"] is True and "affine" not in order.content
    assert train_to(100, 3).content["config"]["reset"] is False

    # the site obeyed: its round 3 is what a site starting from the source model sends
    site_cfg = site_config_of(order)
    fresh = Site("gamma", open_site_data(site_cfg, "gamma"), tmp_path / "fresh", site_cfg, checkpoint).run_round(3)
    got = affine(reply_of(grid, 1, 3).content)
    assert got.keys() == fresh["affine"].keys()
    for key, value in fresh["affine"].items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6)
    client, children = child_runs(tmp_path)
    flagged = client.get_metric_history(children["gamma"].info.run_id, "round/flagged")
    resets = client.get_metric_history(children["gamma"].info.run_id, "round/reset")
    assert [(m.step, m.value) for m in flagged] == [(1, 0.0), (2, 1.0), (3, 0.0)]
    assert [(m.step, m.value) for m in resets] == [(1, 0.0), (2, 0.0), (3, 1.0)]
