"""End to end on loopback: a SuperLink with TLS and SuperNode authentication, two registered SuperNodes
on tiny synthetic sites, one unregistered SuperNode, `flwr run` for two rounds, then the MLflow record."""
from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from client.site import load_source
from simulations.deploy_local import LIMITS, Deployment

SIZE = 32


@pytest.mark.slow
def test_tls_deployment_with_registered_nodes(tmp_path, checkpoint):
    overrides = [f"checkpoint={checkpoint}", f"data.size={SIZE}", "data.synthetic_test=4", "model.encoder=resnet18",
                 "model.decoder_width=16", "federation.rounds=2", "federation=fed_stats", "mlflow.overlays=0",
                 f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"out_dir={tmp_path}/runs",
                 "data.sites=[north,south]"]
    limits = {**LIMITS, "source-digest": load_source(checkpoint)[2], "report-dice": "true"}  # each site's own
    with Deployment(tmp_path / "deploy") as dep:
        dep.start_superlink(nodes=2)
        assert (dep.certs / "superlink.pem").is_file() and (dep.certs / "ca.pem").is_file()
        for i, (name, domain) in enumerate([("north", "gamma"), ("south", "colour_cast")]):
            dep.register(i)
            dep.start_supernode(i, {"site": name, "domain": domain, "state-dir": str(tmp_path / "sites" / name),
                                    "ledger-dir": str(tmp_path / "ledgers" / name), **limits})
        assert not list(dep.certs.glob("*.key*")) or {p.name for p in dep.certs.glob("*.key")} == {"ca.key", "superlink.key"}
        intruder = dep.start_supernode(2, {"site": "intruder", "domain": "blur", "state-dir": str(tmp_path / "x"),
                                           "ledger-dir": str(tmp_path / "lx"), **limits})  # a key never registered
        status = dep.run(overrides, timeout=500)
        assert status == "finished:completed", (dep.logs / "flwr_run.log").read_text()[-3000:]
        intruder.wait(timeout=120)
        assert intruder.returncode != 0  # refused: it never joined
        assert "No SuperNode found with the given public key" in (dep.logs / "superlink.log").read_text()
        assert (dep.logs / "superlink.log").read_text().count("https://") >= 1  # TLS, not plain HTTP
    assert all(p.poll() is not None for p in dep.procs)  # everything it started is gone

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    children = {r.data.tags["fedgrata.site"]: r for r in runs if "fedgrata.site" in r.data.tags}
    assert set(children) == {"north", "south"}  # the intruder took no part
    for child in children.values():
        assert [m.step for m in client.get_metric_history(child.info.run_id, "round/dice_mean")] == [1, 2]
        eps = client.get_metric_history(child.info.run_id, "round/dp_epsilon")
        assert 0 < eps[-1].value <= 8.0
    assert (tmp_path / "sites" / "north" / "site.pt").is_file()  # state where the node config put it


def test_deploy_command_line_separates_sites_from_overrides(monkeypatch):
    import simulations.deploy_local as deploy

    seen = {}
    monkeypatch.setattr(deploy, "load_config", lambda overrides: seen.setdefault("overrides", overrides))

    class Stop(Exception):
        pass

    def no_processes(self, nodes):
        seen["nodes"] = nodes
        raise Stop

    monkeypatch.setattr(deploy.Deployment, "start_superlink", no_processes)
    with pytest.raises(Stop):
        deploy.main(["north=gamma", "south=colour_cast", "--", "federation=fed_stats"])
    assert seen["nodes"] == 2
    assert seen["overrides"] == ["federation=fed_stats", "data.sites=[north,south]"]


def test_a_taken_port_costs_the_superlink_a_retry(tmp_path, monkeypatch):
    """The port picked for the SuperLink is taken before it binds (here: held, not listening, by the test):
    the deployment starts it on another port instead of failing or talking to whoever holds it."""
    import socket

    import simulations.deploy_local as deploy

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    taken = held.getsockname()[1]
    ports = iter([taken])
    real = deploy.free_port
    monkeypatch.setattr(deploy, "free_port", lambda: next(ports, None) or real())
    try:
        with Deployment(tmp_path / "deploy", insecure=True) as dep:
            assert dep.port == taken
            dep.start_superlink(nodes=1)
            assert dep.port != taken and sum(p.poll() is None for p in dep.procs) == 1
            assert f"127.0.0.1:{dep.port}" in (dep.dir / "flwr" / "config.toml").read_text()
    finally:
        held.close()


def test_a_taken_port_costs_a_supernode_a_retry(tmp_path, monkeypatch):
    """The port picked for a SuperNode's Runtime API (where its ClientApps connect) is taken before the
    SuperNode binds it (held, not listening, by the test): the SuperNode it returns listens on another
    port instead of having died at start-up. No SuperLink is needed: the API is bound before it connects."""
    import socket

    import simulations.deploy_local as deploy

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    taken = held.getsockname()[1]
    try:
        with Deployment(tmp_path / "deploy", insecure=True) as dep:
            ports = iter([taken])
            real = deploy.free_port
            monkeypatch.setattr(deploy, "free_port", lambda: next(ports, None) or real())
            node = dep.start_supernode(0, {"site": "north", "domain": "gamma", "state-dir": str(tmp_path / "north")})
            port = int(node.args[node.args.index("--port") + 1])
            assert port != taken  # the taken port was given up ...
            assert node.poll() is None  # ... and the SuperNode returned is alive, listening on its own
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            assert len(dep.procs) == 2 and dep.procs[0].poll() is not None  # the first attempt died on the taken port
    finally:
        held.close()
