"""Flower's supported path: flat run-config keys, JSON from the CLI, a sized local federation, and
only our own processes stopped."""
from __future__ import annotations

import io
import os
import tomllib
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk
from flwr.common.constant import FAB_MAX_SIZE

from server.config import RUN_CONFIG_KEYS, load_config, run_config_overrides
from simulations import flwr_local
from simulations.flwr_cli import json_of

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_declares_every_flat_key_and_they_compose():
    app_config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(app_config) == {*RUN_CONFIG_KEYS, "overrides", "base-dir"}
    cfg = load_config(run_config_overrides(app_config))  # the shipped defaults compose to conf/federate.yaml's
    assert cfg == load_config([])


def test_flat_keys_map_onto_the_configuration_and_overrides_win():
    cfg = load_config(run_config_overrides({"federation": "fed_stats", "rounds": 2, "epsilon": 4.0,
                                            "sites": "gamma, low_contrast", "overrides": "federation=fed_affine seed=3"}))
    assert cfg.federation.variant.value == "fed_affine"  # the power users' string wins over the flat key
    assert cfg.federation.rounds == 2 and cfg.privacy.epsilon == 4.0 and cfg.seed == 3
    assert cfg.data.sites == ["gamma", "low_contrast"]
    with pytest.raises(ValueError, match="unknown key.*'round'"):
        run_config_overrides({"round": 3})


def test_cli_json_is_read_past_notices():
    text = 'Note: something\n{\n  "success": true,\n  "run-id": "123"\n}\n'
    assert json_of(text) == {"success": True, "run-id": "123"}
    with pytest.raises(ValueError):
        json_of("Successfully started run 123")  # text meant for people is never scraped


def test_the_local_federation_has_one_supernode_per_site():
    assert "num-supernodes=4 client-resources-num-cpus=1" in flwr_local.federation_config(4)


def test_no_process_is_found_or_stopped_by_name():
    for path in (ROOT / "simulations").glob("*.py"):
        text = path.read_text()
        assert "pgrep" not in text and "pkill" not in text and "killall" not in text, path


def test_the_local_superlink_is_ours_and_stopped_by_its_process_group(tmp_path):
    with flwr_local.LocalSuperLink(tmp_path / "flwr") as link:
        pid = link.proc.pid
        assert os.getpgid(pid) == pid  # its own session: stopping it touches nothing else
        assert f"127.0.0.1:{link.port}" in (tmp_path / "flwr" / "config.toml").read_text()
    assert link.proc.poll() is not None


def test_a_partial_federation_says_so_and_names_the_fix(tmp_path, checkpoint, monkeypatch, capsys):
    """Two sites configured, one SuperNode up (plain `flwr run .` without --federation-config): the run
    goes on with the site it has, but says so first. The wait for the missing node runs on the test's
    clock, not 120 real seconds."""
    import time

    import server.federation as fed
    from client.client_app import app as client_app
    from server.inline_grid import InlineGrid
    from tests.conftest import tiny_config

    class Clock:  # time.monotonic/sleep for the node wait; everything else is the real module
        now = 0.0

        def monotonic(self):
            return self.now

        def sleep(self, seconds):
            self.now += seconds

        def __getattr__(self, name):
            return getattr(time, name)

    monkeypatch.setattr(fed, "time", Clock())
    cfg = tiny_config(tmp_path, checkpoint)  # data.sites: colour_cast, gamma
    grid = InlineGrid(client_app, [{"partition-id": 0, "num-partitions": 2}])
    result = fed.federate(grid, cfg, tmp_path)
    out = capsys.readouterr().out
    assert "only 1 of the 2 configured sites (data.sites) joined" in out
    assert '--federation-config "num-supernodes=2"' in out
    assert list(result["sites"]) == ["colour_cast"]


def test_the_app_bundle_stays_under_flowers_size_limit():
    """`flwr run` refuses a FAB over 10 MB; bench results and docs grow every session and stay out."""
    fab = build_fab_from_disk(ROOT)
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert len(fab) < FAB_MAX_SIZE / 2, f"FAB is {len(fab):,} bytes"
    assert "client/client_app.py" in names and "server/server_app.py" in names
    assert not any(n.startswith(("bench/results/", "docs/")) for n in names)
