"""The Flower ClientApp every hospital runs. Thin: it maps messages onto a Site (client/site.py).

Node config (deployment, `flower-supernode --node-config`):
  site        the site's label in the coordinator's tables (default: the domain)
  data-kind   folder (unlabelled images) or fundus (the benchmark CSV layout, labelled)
  data-root   the image folder, or the CSV folder for fundus
  domain      fundus: which domain's CSV; synthetic: which style (no data-root needed)
  state-dir   where the site keeps its state between rounds and processes
  checkpoint  optional: a local copy of the source model (else the coordinator sends it once)
  max-epsilon optional: the site's own privacy budget; the coordinator's configuration cannot raise it
In simulation, partition-id picks the site from the configured list and the state lives under the
coordinator's state root.
"""
from __future__ import annotations

import functools
import json
import re
import traceback
from dataclasses import replace
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client.protocol import audit, layer_tensors, reply_content
from client.site import Site, SiteConfig, load_source, open_site_data
from grata.config import DataConfig, open_domain
from grata.models import ModelConfig, ResUNet, save_checkpoint

app = ClientApp()
PATH = re.compile(r"(?:[A-Za-z]:)?[/\\][^\s'\":,;)]+")


def redact(text: str) -> str:
    """An error the coordinator may see: the site's file paths are replaced (they stay in the site's log)."""
    return PATH.sub("<path>", text)


def site_errors(handler):
    """Run a handler; on failure the site's log keeps the full error, the coordinator gets it without paths."""
    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as exc:
            traceback.print_exc()
            raise RuntimeError(redact(f"{type(exc).__name__}: {exc}")) from None
    return wrapped


def site_identity(context: Context, cfg: SiteConfig) -> tuple[str, object, Path]:
    """(site name, its dataset, its state folder) from the node config."""
    node = context.node_config
    if "data-root" in node or "domain" in node:  # a deployed site names its own data
        kind = str(node.get("data-kind", "folder" if "data-root" in node else cfg.data["kind"]))
        data = replace(DataConfig(**{k: v for k, v in cfg.data.items() if k in DataConfig.__dataclass_fields__}),
                       kind=kind, root=str(node.get("data-root", cfg.data["root"])))
        domain = str(node.get("domain", ""))
        dataset = open_domain(data, domain, data.site_split)
        name = str(node.get("site", domain or Path(str(node["data-root"])).name))
    else:
        sites = cfg.data["sites"]
        pid = int(node["partition-id"])
        if pid >= len(sites):
            raise ValueError(f"partition-id {pid}: only {len(sites)} sites are configured ({sites})")
        name = sites[pid]
        dataset = open_site_data(cfg, name)
    state_dir = Path(str(node["state-dir"])) if "state-dir" in node else Path(cfg.state_root) / name
    return name, dataset, state_dir


def find_model(state_dir: Path, context: Context, config: ConfigRecord) -> Path | None:
    """A local source model whose weights match the coordinator's digest, or None."""
    candidates = [state_dir / "source_model.pt", context.node_config.get("checkpoint"), config.get("model_hint")]
    for path in candidates:
        if path and Path(str(path)).is_file() and load_source(path)[2] == config["model_digest"]:
            return Path(str(path))
    return None


def _setup(msg: Message, context: Context) -> tuple[SiteConfig, str, object, Path, ConfigRecord]:
    config = msg.content["config"]
    cfg = SiteConfig(**json.loads(str(config["site_config"])))
    name, dataset, state_dir = site_identity(context, cfg)
    return cfg, name, dataset, state_dir, config


@app.query()
@site_errors
def query(msg: Message, context: Context) -> Message:
    """Introduce the site: its name, its image count, whether it holds labels and the source model."""
    cfg, name, dataset, state_dir, config = _setup(msg, context)
    labelled = len(dataset) > 0 and dataset[0].mask is not None
    site = {"name": name, "status": "ok", "has_model": find_model(state_dir, context, config) is not None,
            "images_total": len(dataset), "labelled": labelled}
    return Message(RecordDict({"site": ConfigRecord(site)}), reply_to=msg)


@app.train()
@site_errors
def train(msg: Message, context: Context) -> Message:
    """Adapt over this round's chunk and reply with what the variant allows."""
    cfg, name, dataset, state_dir, config = _setup(msg, context)
    if "model" in msg.content:  # the coordinator sent the source model: keep it for later rounds
        model = ResUNet(ModelConfig(**json.loads(str(config["model_config"]))))
        model.load_state_dict(msg.content["model"].to_torch_state_dict())
        save_checkpoint(state_dir / "source_model.pt", model, shift_reference=float(config["shift_reference"]),
                        quality=json.loads(str(config["quality"])))
    model_path = find_model(state_dir, context, config)
    if model_path is None:
        raise RuntimeError(f"site {name}: no source model matching digest {config['model_digest'][:12]}")
    cap = context.node_config.get("max-epsilon")
    site = Site(name, dataset, state_dir, cfg, model_path, max_epsilon=float(cap) if cap is not None else None)
    if bool(config.get("reset", False)):
        site.reset_to_source()
    if "pooled" in msg.content:
        weights = config.get("pooled_weights")  # per layer: the share the privacy noise left as signal
        site.set_pooled(layer_tensors(msg.content["pooled"], ("m1", "m2")),
                        [float(w) for w in weights] if weights is not None else float(config["pooled_weight"]))
    if "affine" in msg.content:
        site.set_affine(layer_tensors(msg.content["affine"], ("weight", "bias")))
    out = site.run_round(int(config["round"]))
    content = reply_content(name, out)
    audit(content, cfg.variant)  # fail closed: nothing outside the allowed list leaves the site
    return Message(content, reply_to=msg)
