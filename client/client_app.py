"""The Flower ClientApp every hospital runs. Thin: it maps messages onto a Site (client/site.py).

Node config (deployment, `flower-supernode --node-config`):
  site        the site's label in the coordinator's tables (default: the domain)
  data-kind   folder (unlabelled images) or fundus (the benchmark CSV layout, labelled)
  data-root   the image folder, or the CSV folder for fundus
  domain      fundus: which domain's CSV; synthetic: which style (no data-root needed)
  state-dir   where the site keeps its state between rounds and processes
  checkpoint  optional: a local copy of the source model (else the coordinator sends it once)
  max-epsilon, max-delta, min-noise-multiplier, min-images, ledger-dir, source-digest: the site's own
              privacy limits, required for a deployed site (client/limits.py); the coordinator cannot
              raise them, a round asking for more is refused with an error naming the limit
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

from client.limits import SiteLimits
from client.site import Site
from grata.config import DataConfig, open_domain
from grata.data import first_readable
from grata.federation.protocol import reply_records
from grata.federation.siteconfig import SiteConfig, load_source, open_site_data, source_digest
from grata.models import CheckpointError, ModelConfig, ResUNet, save_checkpoint
from wire import audit, to_plain, to_records

app = ClientApp()
RESERVED = ("config", "model")  # a train message's own records; every other record is the variant's broadcast
# A path runs from its first separator to the end of its quotes or of the line: spaces do not end it
# (a path with a space must not leak its tail). Over-redacting a message's tail is the safe side.
QUOTED = re.compile(r"""(['"])(?:[A-Za-z]:)?[/\\~][^'"]*\1""")
BARE = re.compile(r"(?<![\w.])(?:[A-Za-z]:)?(?:[/\\]|~/)\S.*$", re.MULTILINE)


def redact(text: str, known: tuple[str, ...] = ()) -> str:
    """An error the coordinator may see: the site's file paths are replaced (they stay in the site's log).
    known: the site's own paths (data root, state folder), removed wherever they appear first."""
    for path in sorted((k for k in known if k and len(k) > 1), key=len, reverse=True):
        text = text.replace(path, "<path>")
    return BARE.sub("<path>", QUOTED.sub("<path>", text))


def site_errors(handler):
    """Run a handler; on failure the site's log keeps the full error, the coordinator gets it without paths."""
    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as exc:
            traceback.print_exc()
            known = tuple(str(context.node_config.get(k, "")) for k in ("data-root", "state-dir", "ledger-dir", "checkpoint"))
            raise RuntimeError(redact(f"{type(exc).__name__}: {exc}", known)) from None
    return wrapped


def deployed(context: Context) -> bool:
    """A deployed site names its own data in its node config (simulated ones get a partition id)."""
    return "data-root" in context.node_config or "domain" in context.node_config


def site_limits(context: Context, cfg: SiteConfig, state_dir: Path) -> SiteLimits:
    return SiteLimits.from_node(context.node_config, deployed(context), cfg, state_dir / "ledger")


def site_identity(context: Context, cfg: SiteConfig) -> tuple[str, object, Path]:
    """(site name, its dataset, its state folder) from the node config."""
    node = context.node_config
    if deployed(context):
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


def reply_content(name: str, out: dict) -> RecordDict:
    """A Site.run_round result as Flower records."""
    return to_records(reply_records(name, out))


def find_model(state_dir: Path, context: Context, config: ConfigRecord) -> Path | None:
    """A local source model whose source digest matches the coordinator's, or None. A candidate that is
    not a readable checkpoint is skipped like a missing one: the coordinator names `model_hint`, and an
    error for an unreadable file would tell it that the file exists."""
    candidates = [state_dir / "source_model.pt", context.node_config.get("checkpoint"), config.get("model_hint")]
    for path in candidates:
        try:
            if path and Path(str(path)).is_file() and load_source(path)[2] == config["model_digest"]:
                return Path(str(path))
        except (CheckpointError, OSError, ValueError, TypeError):
            continue
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
    first = first_readable(dataset, cfg.data.get("on_error", "raise"))  # the skip rule applies here too
    labelled = first is not None and first.mask is not None
    site_limits(context, cfg, state_dir).check(cfg)  # refuse a run that asks for more, before it starts
    site = {"name": name, "status": "ok", "has_model": find_model(state_dir, context, config) is not None,
            "images_total": len(dataset), "labelled": labelled}
    content = RecordDict({"site": ConfigRecord(site)})
    audit(content, "query")
    return Message(content, reply_to=msg)


@app.train()
@site_errors
def train(msg: Message, context: Context) -> Message:
    """Adapt over this round's chunk and reply with what the variant allows."""
    cfg, name, dataset, state_dir, config = _setup(msg, context)
    limits = site_limits(context, cfg, state_dir)
    limits.check(cfg)  # before any work: a coordinator asking for more than the node config allows is refused
    limits.check_digest(str(config["model_digest"]))
    if "model" in msg.content:  # the coordinator sent the source model: keep it for later rounds
        model = ResUNet(ModelConfig(**json.loads(str(config["model_config"]))))
        model.load_state_dict(msg.content["model"].to_torch_state_dict())
        meta = {"shift_reference": float(config["shift_reference"]), "quality": json.loads(str(config["quality"])),
                "geometry": json.loads(str(config.get("geometry", "{}")))}
        digest = source_digest(model, meta)  # the weights and the metadata the site will act on
        if digest != str(config["model_digest"]):
            raise RuntimeError(f"site {name}: the model sent has digest {digest[:12]}, not the announced one")
        limits.check_digest(digest)
        save_checkpoint(state_dir / "source_model.pt", model, **meta)
    model_path = find_model(state_dir, context, config)
    if model_path is None:
        raise RuntimeError(f"site {name}: no source model matching digest {config['model_digest'][:12]}")
    # a deployed site's ledger is keyed to what its own node config says its data is, never to values
    # the coordinator sends (which it could vary to open a fresh ledger)
    identity = ({"site": name, **{k: str(context.node_config.get(k, "")) for k in ("data-kind", "data-root", "domain")}}
                if deployed(context) else None)
    site = Site(name, dataset, state_dir, cfg, model_path, limits=limits, identity=identity)
    if bool(config.get("reset", False)):
        site.reset_to_source()
    broadcast = to_plain(RecordDict({k: v for k, v in msg.content.items() if k not in RESERVED}))
    site.strategy.apply(site, broadcast, config)  # through the site's bounded setters only
    out = site.run_round(int(config["round"]), int(config.get("joined", 1)))
    content = reply_content(name, out)
    audit(content, cfg.variant, [m1.numel() for m1, _ in site.refs])  # fail closed: nothing outside the allowed list leaves the site
    return Message(content, reply_to=msg)
