"""One federation run over a Flower Grid: the coordinator's loop. server_app.py only wires it up.

  query:  every site says who it is, how many images it has, whether it holds labels and the model
  round r = 1..R: a node not yet in the federation is asked who it is, and joins if its round has
          come (federation.join_round; a node that appears later joins when it appears); every
          member gets the variant's broadcast (its strategy's `broadcast`, a newcomer's in its first
          round) and adapts over its next chunk; replies are audited against the variant's allowed
          list, tracked (proxy, flags), aggregated by the strategy and logged
  end:    per-site table, CSVs, plot, overlays; the MLflow runs are closed
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from grata.config import resolve_root
from grata.federation.protocol import INTRO, ReplyRejected
from grata.federation.protocol import audit as audit_plain
from grata.federation.siteconfig import SiteConfig, load_source
from grata.federation.strategies import get_strategy
from grata.privacy import calibrate, source_moments
from grata.progress import Progress
from grata.train_source import ensure_source
from server.config import AffineWeighting, FederateConfig, FederationConfig, Variant, resolved
from server.coordinator import Coordinator, SiteRecord
from wire import to_plain
from server.report import mean_row, site_summary, write_report
from server.tracking import Tracker, flatten

# what a coordinator's saved progress may hold besides tensors and plain data (torch.load weights_only)
torch.serialization.add_safe_globals([Coordinator, SiteRecord, FederationConfig, Variant, AffineWeighting])

MEAN_KEYS = ("dice_proxy", "align_cos_mean", "lr_mean", "entropy", "dp_epsilon", "dice_disc", "dice_cup", "dice_mean")


def wait_for_nodes(grid: Grid, n: int, timeout: float = 120.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n or time.monotonic() > deadline:
            return nodes
        time.sleep(0.5)


def source_refs(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per BN layer (running mean, running var), in the order the sites' adapters list them."""
    return source_moments(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def _ask(grid: Grid, contents: dict[int, RecordDict], kind: str, rnd: int, timeout: float) -> dict[int, Message]:
    messages = [Message(content, dst_node_id=nid, message_type=kind, group_id=str(rnd)) for nid, content in contents.items()]
    replies = grid.send_and_receive(messages, timeout=timeout or None)
    return {r.metadata.src_node_id: r for r in replies}


def save_progress(run_dir: Path, rnd: int, coord: Coordinator, tracker: Tracker, config: dict) -> None:
    """After every round, atomically: what a resumed coordinator needs to go on from round rnd + 1."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "coordinator.pt.tmp"
    torch.save({"round": rnd, "coordinator": coord, "config": config,
                "mlflow": (tracker.parent, tracker.children)}, tmp)
    tmp.replace(run_dir / "coordinator.pt")


def load_progress(run_dir: Path, config: dict) -> dict[str, Any]:
    path = run_dir / "coordinator.pt"
    if not path.is_file():
        raise FileNotFoundError(f"resume: {path} does not exist (no finished round to resume from)")
    state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and the allow-listed classes below
    differ = config_diff(state["config"], config)
    if differ:
        raise ValueError(f"resume: {run_dir} was run with another configuration; these settings differ "
                         f"(saved -> now): {'; '.join(differ)}. Resume without overrides to use the saved ones.")
    return state


def config_diff(saved: dict, now: dict, ignore: tuple[str, ...] = ("resume", "engine")) -> list[str]:
    """The dotted keys whose values differ, as "key: saved -> now" (how a run is launched is not compared)."""
    a, b = flatten(saved), flatten(now)
    keys = sorted(k for k in a.keys() | b.keys() if k.split(".")[0] not in ignore and a.get(k) != b.get(k))
    return [f"{k}: {a.get(k, '<unset>')} -> {b.get(k, '<unset>')}" for k in keys]


def introduce(grid: Grid, cfg: FederateConfig, common: dict[str, Any], nodes: list[int],
              rnd: int = 0) -> dict[int, dict[str, Any]]:
    """Ask these nodes who they are (name, image count, labels, whether they hold the source model);
    returns the audited introductions by node id (a node that fails is named and left out)."""
    if not nodes:
        return {}
    intro = _ask(grid, {n: RecordDict({"config": ConfigRecord(common)}) for n in nodes}, "query", rnd,
                 cfg.federation.round_timeout_s)
    sites: dict[int, dict[str, Any]] = {}
    for nid, reply in intro.items():
        if reply.has_error():
            print(f"node {nid} could not introduce itself: {reply.error.reason}")
            continue
        try:
            audit_plain(to_plain(reply.content), INTRO, label="an introduction")
        except ReplyRejected as exc:
            print(f"node {nid}: introduction not used: {exc}")
            continue
        sites[nid] = dict(reply.content["site"])
    return sites


def round_content(rnd: int, common: dict[str, Any], coord: Coordinator, name: str, reset: bool,
                  source: tuple[torch.nn.Module, dict] | None) -> RecordDict:
    """What site `name` gets this round: the configuration, a reset order, its first round, what
    the variant broadcasts to it, and `source` (model, metadata) when it lacks the model."""
    joined = coord.site(name).joined
    arrays, extra = coord.strategy.broadcast(coord, name, rnd, reset, first=joined == rnd)
    if set(arrays) & set(RESERVED) or set(extra) & {"round", "reset", "joined", *common}:
        raise ValueError(f"variant {coord.cfg.variant.value} broadcasts reserved names: {sorted(set(arrays) | set(extra))}")
    rec = {**common, "round": rnd, "reset": reset, "joined": joined, **extra}
    content = RecordDict()
    if source is not None:
        model, meta = source
        rec.update(model_config=json.dumps(asdict(model.config)), shift_reference=float(meta["shift_reference"]),
                   quality=json.dumps(meta["quality"]), geometry=json.dumps(meta.get("geometry") or {}))
        content["model"] = ArrayRecord(model.state_dict())
    for record, items in arrays.items():
        content[record] = ArrayRecord({k: v.detach().float().contiguous() for k, v in items.items()})
    content["config"] = ConfigRecord(rec)
    return content


RESERVED = ("config", "model")  # a train message's own records; the variant's broadcast uses other names


def accept(reply: Message | None, coord: Coordinator) -> tuple[dict[str, float], Any, list[dict[str, Any]]]:
    """Audit a reply against the variant's allowed list and let the variant parse it: (metrics, what
    the variant parsed, inventory). Raises ReplyRejected or ValueError on anything that must not be
    used; nothing is aggregated here."""
    if reply is None:
        raise ReplyRejected("no reply within the round timeout")
    if reply.has_error():
        raise ReplyRejected(f"site error: {reply.error.reason}")
    strategy, plain = coord.strategy, to_plain(reply.content)
    inventory = audit_plain(plain, strategy.allowed, strategy.required, [mu.numel() for mu, _ in coord.refs],
                            label=f"variant {strategy.name}")
    metrics = dict(plain["metrics"])
    metrics.update(plain.get("privacy", {}))
    return metrics, strategy.accept(coord, plain, metrics), inventory


def federate(grid: Grid, cfg: FederateConfig, base: Path, run_dir: Path | None = None,
             resume: bool = False) -> dict[str, Any]:
    """Run cfg.federation.variant over the grid's nodes; returns the per-site summary and timings.
    resume=True continues the interrupted run in `run_dir` after its last finished round."""
    t_start = time.perf_counter()
    variant = cfg.federation.variant
    checkpoint = ensure_source(cfg, base)
    model, meta, digest = load_source(checkpoint)
    if model.config != cfg.model:
        raise ValueError(f"{checkpoint} holds {model.config}, the configuration asks for {cfg.model}")
    rounds = cfg.federation.rounds
    private = get_strategy(variant.value).private  # the variant's declaration: its sites keep a ledger
    sigma = calibrate(cfg.privacy.epsilon, cfg.privacy.delta, rounds, cfg.privacy.accountant) if private else 1.0
    run_dir = Path(run_dir or Path(base) / cfg.out_dir / f"{variant.value}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir = run_dir if run_dir.is_absolute() else Path(base) / run_dir
    data = {**asdict(cfg.data), "root": str(resolve_root(cfg.data.root, base).resolve())}  # sites may run elsewhere
    site_cfg = SiteConfig(data=data, adapter=cfg.method.adapter, options=dict(cfg.method.options),
                          variant=variant.value, rounds=rounds, seed=cfg.seed, threads=cfg.threads,
                          overlays=cfg.mlflow.overlays, clip=cfg.privacy.clip, noise_multiplier=sigma,
                          epsilon=cfg.privacy.epsilon, delta=cfg.privacy.delta, accountant=cfg.privacy.accountant,
                          min_images=cfg.privacy.min_images, metrics_share=cfg.privacy.metrics_share,
                          report_dice=cfg.privacy.report_dice, state_root=str((run_dir / "sites").resolve()),
                          strategy_options=get_strategy(variant.value).settings(cfg.federation.options or {}))
    common = {"site_config": json.dumps(asdict(site_cfg)), "model_digest": digest, "model_hint": str(checkpoint.resolve())}
    config = resolved(cfg)
    progress = load_progress(run_dir, config) if resume else None  # fail before any site is asked

    print(f"run folder: {run_dir}", flush=True)
    first = progress["round"] + 1 if progress else 1
    start = min(first, rounds)  # the round whose members start now (a finished run: the last)
    starters = [s for s in cfg.data.sites if cfg.federation.joins(s) <= start]
    nodes = wait_for_nodes(grid, len(starters))
    if len(nodes) < len(starters):  # a partial federation must never run quietly
        print(f"WARNING: only {len(nodes)} of the {len(starters)} configured sites (data.sites) joined. "
              f"Under `flwr run .` size the local federation: --federation-config \"num-supernodes="
              f"{len(cfg.data.sites)}\" (make flwr-run does this).", flush=True)
    answered = introduce(grid, cfg, common, nodes, 0)
    if len(answered) < cfg.federation.min_sites:
        raise RuntimeError(f"only {len(answered)} of {len(nodes)} sites answered; federation.min_sites={cfg.federation.min_sites}")
    # a site whose round has not come is not a member yet: it is asked again, and joins, in its round
    sites = {nid: s for nid, s in answered.items() if cfg.federation.joins(str(s["name"])) <= start}
    names = {nid: str(s["name"]) for nid, s in sites.items()}
    print(f"{variant.value}: {len(sites)} sites: " + ", ".join(
        f"{s['name']} ({s['images_total']} images{', labelled' if s['labelled'] else ''})" for s in sites.values())
        + "".join(f"; {s['name']} joins in round {cfg.federation.joins(str(s['name']))}"
                  for nid, s in answered.items() if nid not in sites))
    if private:
        print(f"  privacy: epsilon {cfg.privacy.epsilon}, delta {cfg.privacy.delta} over {rounds} releases "
              f"-> noise multiplier {sigma:.3f} per round (BN statistics {sigma / (1 - cfg.privacy.metrics_share) ** 0.5:.3f}, "
              f"Dice proxy {sigma / cfg.privacy.metrics_share ** 0.5:.3f}), clip {cfg.privacy.clip}")

    def dataset(s: dict[str, Any]) -> dict[str, Any]:
        # the coordinator names each site's stream by its label only: a site's paths stay at the site
        return {"kind": cfg.data.kind, "source": f"{cfg.data.kind}:{s['name']}", "images": int(s["images_total"]),
                "labelled": bool(s["labelled"]), "split": cfg.data.site_split, "size": cfg.data.size}

    tracker = Tracker(cfg.mlflow, base, variant.value, config, sorted(names.values()), run_dir / "mlflow_offline.jsonl",
                      runs=progress["mlflow"] if progress else None, group=cfg.mlflow.group or run_dir.name,
                      datasets={str(s["name"]): dataset(s) for s in sites.values()})
    coord = progress["coordinator"] if progress else Coordinator(cfg.federation, source_refs(model))
    # what a private variant's accept checks a release's noise against: the run's own, never the site's word
    coord.state.setdefault("privacy", {"noise_multiplier": sigma, "metrics_share": cfg.privacy.metrics_share})
    if progress:
        print(f"  resuming {run_dir.name} after round {progress['round']} of {rounds}"
              + (": every round is done, only the report is rewritten" if first > rounds else ""))
    needs_model = {nid for nid, s in sites.items() if not s["has_model"]}

    def join_new(rnd: int) -> None:
        """Nodes not yet members: asked who they are; those whose round has come join now."""
        new = introduce(grid, cfg, common, [n for n in sorted(grid.get_node_ids()) if n not in names], rnd)
        for nid, s in new.items():
            name = str(s["name"])
            if cfg.federation.joins(name) > rnd:
                continue
            names[nid] = name
            if not s["has_model"]:
                needs_model.add(nid)
            tracker.add_site(name, dataset(s))
            print(f"  round {rnd}: {name} joins ({s['images_total']} images{', labelled' if s['labelled'] else ''})",
                  flush=True)

    sent: list[dict[str, Any]] = []  # the audit: every accepted reply's keys, shapes and sizes
    status, bookkeeping_s, round_s = "FAILED", 0.0, []  # bookkeeping: MLflow writes and the coordinator's saved state
    startup_s = time.perf_counter() - t_start  # sites introduced (in simulation: the engine's workers started)
    bar = Progress(max(0, rounds - first + 1), f"{variant.value}: rounds", every=rounds + 1)  # off a terminal the round lines say it
    try:
        for rnd in range(first, rounds + 1):
            t0 = time.perf_counter()
            if rnd > start:
                join_new(rnd)
            for name in names.values():  # a site's first round: the variant's newcomer broadcast, its stream split from here
                coord.site(name).joined = coord.site(name).joined or rnd
            resets = {name: coord.take_reset(name) for name in names.values()}
            contents = {nid: round_content(rnd, common, coord, name, resets[name],
                                           (model, meta) if nid in needs_model else None)
                        for nid, name in names.items()}
            replies = _ask(grid, contents, "train", rnd, cfg.federation.round_timeout_s)
            per_site, items, failed = {}, {}, {}
            for nid, name in names.items():
                reply = replies.get(nid)
                try:
                    metrics, parsed, inventory = accept(reply, coord)
                    sent.append({"site": name, "round": rnd, "items": inventory,
                                 "bytes": sum(item["bytes"] for item in inventory)})
                except (ReplyRejected, ValueError, KeyError) as exc:  # recorded, logged, never aggregated
                    coord.record_failure(name, rnd)
                    print(f"  round {rnd}: {name}: reply not used: {exc}")
                    tracker.tag_site(name, f"fedgrata.failure.round{rnd}", str(exc)[:500])
                    failed[name] = {"reply_failed": 1.0}
                    continue
                needs_model.discard(nid)
                flagged = coord.observe(name, rnd, {**metrics, "reset": float(resets[name])})  # counted in the summary
                item = coord.strategy.admit(coord, name, parsed, metrics, flagged)
                if item is not None:
                    items[name] = item
                per_site[name] = {**metrics, "flagged": float(flagged), "reset": float(resets[name])}
            coord.end_round(items)
            if len(per_site) < cfg.federation.min_sites:
                raise RuntimeError(f"round {rnd}: {len(per_site)} usable replies, federation.min_sites={cfg.federation.min_sites}")
            means = {k: sum(m[k] for m in per_site.values() if k in m) / n
                     for k in MEAN_KEYS if (n := sum(k in m for m in per_site.values()))}
            means.update(coord.strategy.round_means(coord))
            t_book = time.perf_counter()
            tracker.log_round(rnd, {**per_site, **failed}, means)
            save_progress(run_dir, rnd, coord, tracker, config)
            bookkeeping_s += time.perf_counter() - t_book
            round_s.append(time.perf_counter() - t0)
            bar.write(f"  round {rnd}/{rounds} ({time.perf_counter() - t0:.0f} s): " + "  ".join(
                f"{n} proxy {m.get('dice_proxy', float('nan')):.1f}"
                + (f" dice {m['dice_mean']:.1f}" if "dice_mean" in m else "")
                + (" FLAGGED" if m["flagged"] else "") for n, m in sorted(per_site.items())))
            bar.update(**({"dice": means["dice_mean"]} if "dice_mean" in means else {}))
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"  # the runs say what happened; resume continues after the last finished round
        raise
    finally:
        bar.close()
        summary = site_summary(coord)
        wall = time.perf_counter() - t_start
        timing = {"wall_s": wall, "client_compute_s": sum(r.get("seconds", 0.0) for s in coord.sites.values() for r in s.rounds),
                  "bookkeeping_s": bookkeeping_s, "startup_s": startup_s, "round_s": round_s}
        files = write_report(run_dir, variant.value, summary, coord, config, timing)
        files.append(run_dir / "audit.json")
        files[-1].write_text(json.dumps({"variant": variant.value, "replies": sent}, indent=1, default=list))
        for path in files:
            tracker.log_artifact(path)
        for name in names.values():
            for png in sorted((run_dir / "sites" / name / "overlays").glob("*.png")):
                tracker.log_artifact(png, site=name, folder="overlays")
        tracker.log_summary(summary, mean_row(summary))
        tracker.finish(status)
        if status != "FINISHED":
            print(f"{variant.value}: {status} (MLflow runs marked {status})\nrun folder: {run_dir}\n"
                  f"continue with: python -m simulations.run resume={run_dir}", flush=True)
        timing["report_s"] = time.perf_counter() - t_start - wall
    return {"variant": variant.value, "sites": summary, "timing": timing, "run_dir": str(run_dir),
            "mlflow": {"uri": tracker.uri, "parent_run_id": tracker.parent, "offline": tracker.offline}}


__all__ = ["accept", "config_diff", "federate", "introduce", "round_content", "source_refs", "wait_for_nodes"]
