"""The code's shape: who may import whom, and one registry of federation variants (issue 14)."""
from __future__ import annotations

import ast
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
# package -> top-level modules it must never import: client/ and server/ share the wire through
# grata/federation (plain) and wire/ (Flower records), never through each other; grata/ is Flower-
# and MLflow-free; wire/ is what both sides import, so it imports neither
BANNED = {"client": {"server"}, "server": {"client"}, "grata": {"flwr", "mlflow", "client", "server", "wire"},
          "wire": {"client", "server", "mlflow"}}


def imports(path: Path) -> set[str]:
    """The top-level modules a file imports (absolute imports; a relative one names its own package)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def violations(root: Path) -> list[str]:
    return sorted(f"{path.relative_to(root)} imports {sorted(imports(path) & banned)}"
                  for package, banned in BANNED.items() for path in (root / package).rglob("*.py")
                  if imports(path) & banned)


def test_client_and_server_never_import_each_other():
    assert violations(ROOT) == []


def test_the_import_check_catches_a_forbidden_import(tmp_path):
    """The check itself can fail: a server module importing the client's, in any spelling."""
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "a.py").write_text("import os\nfrom client.site import Site\n")
    (tmp_path / "server" / "b.py").write_text("def f():\n    import client.limits as lim\n")  # inside a function too
    (tmp_path / "grata").mkdir()
    (tmp_path / "grata" / "c.py").write_text("from flwr.app import Message\n")
    found = violations(tmp_path)
    assert found == ["grata/c.py imports ['flwr']", "server/a.py imports ['client']", "server/b.py imports ['client']"]


def test_every_variant_is_one_registered_module_with_its_config():
    """The registry, the configuration's choices and conf/federation/ name the same variants."""
    from grata.federation.strategies import STRATEGIES, Strategy
    from server.config import Variant, load_config

    assert list(Variant.__members__) == list(STRATEGIES)
    for name, strategy in STRATEGIES.items():
        assert isinstance(strategy, Strategy) and strategy.name == name
        conf = yaml.safe_load((ROOT / "conf" / "federation" / f"{name}.yaml").read_text())
        assert conf["variant"] == name
        assert load_config([f"federation={name}"]).federation.variant.value == name
        allowed = strategy.allowed
        assert allowed["site"] == {"name", "status"} and "metrics" in allowed
        assert ("privacy" in allowed) == strategy.private  # a private variant answers with its ledger's figures


def test_the_documented_example_variant_works_as_one_module(tmp_path, checkpoint, monkeypatch):
    """docs/federation.md's example, taken from the page as written: registered in the one registry,
    it runs at a site and at the coordinator with nothing else changed, and passes both audits."""
    import re
    import types

    from grata.federation import strategies
    from grata.federation.protocol import audit, reply_records
    from client.site import Site, SiteConfig, open_site_data
    from tests.conftest import SIZE

    text = (ROOT / "docs" / "federation.md").read_text()
    code = re.search(r"```python\n(# grata/federation/strategies/mean_bias.py\n.*?)```", text, re.S).group(1)
    module = types.ModuleType("mean_bias")
    exec(compile(code, "mean_bias.py", "exec"), module.__dict__)
    strategy = module.MeanBias()
    monkeypatch.setitem(strategies.STRATEGIES, "mean_bias", strategy)
    data = {"kind": "synthetic", "root": "", "size": SIZE, "sites": ["gamma"], "synthetic_test": 4, "seed": 0}
    cfg = SiteConfig(data=data, adapter="grata", options={"lr": 1e-2, "bn": "source"}, variant="mean_bias", rounds=2,
                     overlays=0, strategy_options=strategy.settings({"mix": 1.0}))
    site = Site("gamma", open_site_data(cfg, "gamma"), tmp_path / "s", cfg, checkpoint)
    reply = reply_records("gamma", site.run_round(1))
    channels = [mu.numel() for mu, _ in site.refs]
    audit(reply, strategy.allowed, strategy.required, channels)  # what the site checks before sending
    coord = types.SimpleNamespace(state={}, refs=site.refs)
    parsed = strategy.accept(coord, reply, dict(reply["metrics"]))
    strategy.aggregate(coord, {"gamma": parsed, "north": [torch.zeros_like(b) for b in parsed]})
    arrays, config = strategy.broadcast(coord, "gamma", 2, reset=False, first=False)
    strategy.apply(site, arrays, config)  # mix 1.0: the site's BN biases are now the mean, within its limits
    for (name, layer), b in zip(site._norm_names(), coord.state["bias"]):
        b0 = site.adapter.source_state[f"{name}.bias"]
        assert torch.allclose(layer.bias, torch.clamp(b, b0 - site.limits.max_affine_shift, b0 + site.limits.max_affine_shift))
    assert strategy.settings({}) == {"mix": 0.5}
