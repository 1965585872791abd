"""One hospital site: its data, its adapter and everything it keeps between rounds. No Flower here.

Each round the site adapts online over its next chunk of images and returns what its federation
variant sends (grata/federation/strategies/; what may leave is the variant's allowed list in
grata/federation/protocol.py). The site's state lives in its state folder, so a fresh process
(deployment starts one per message) continues exactly where the last left off:
  site.pt           adapter state (BN layers, optimizer, RNG), stream position (loaded weights_only)
  source_model.pt   the source model, when the coordinator had to send it
  overlays/         a few predictions drawn over their images; they stay at the site
The privacy ledger is not here: it lives in the node config's ledger-dir, keyed to the site's data
(grata/ledger.py), so a wiped state folder or a new run does not reset the budget.

What the coordinator sends back enters only through the bounded setters below (set_pooled,
set_affine), which clip it to the site's own limits whatever the variant asks.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.limits import LimitRefused, SiteLimits
from grata.adapters import Adapter, build_adapter
from grata.data import StreamReport, stream
from grata.federation.siteconfig import SiteConfig, chunk, load_source, open_site_data, weights_digest
from grata.federation.strategies import STRATEGIES, RoundLog
from grata.ledger import Ledger, data_key
from grata.metrics import score
from grata.overlay import save_overlay
from grata.privacy import clip_relative, from_relative, source_moments, to_relative

VARIANTS = tuple(STRATEGIES)


@dataclass
class SiteState:
    adapter: dict[str, Any] | None = None
    last_round: int = 0
    resets: int = 0
    last_reply: dict[str, Any] | None = None  # resent unchanged if the coordinator asks for that round again


class Site:
    """A site named `name` adapting over `dataset` with its state in `state_dir`."""

    def __init__(self, name: str, dataset, state_dir: Path, cfg: SiteConfig, model_path: Path,
                 limits: SiteLimits | None = None, identity: dict | None = None) -> None:
        """limits: the site's own (node config; in simulation what the run asks, ledger in state_dir);
        identity: what names its data for the ledger (default: the site name and its data settings)."""
        self.name, self.dataset, self.cfg = name, dataset, cfg
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.limits = limits or SiteLimits.from_node({}, False, cfg, self.state_dir / "ledger")
        self.limits.check(cfg)  # a coordinator asking for more than the site allows is refused here
        model, meta, digest = load_source(model_path)
        self.limits.check_digest(digest)
        # no global torch.manual_seed here: sites run side by side in threads (InlineGrid with a round
        # timeout), and the adapter draws its augmentations from its own seeded generator
        self.adapter: Adapter = build_adapter(cfg.adapter, model, seed=cfg.seed, shift_reference=meta.get("shift_reference"),
                                              quality=meta.get("quality"),
                                              geometry_reference=meta.get("geometry"), **cfg.options)
        if self.adapter.monitor is None:
            raise RuntimeError(f"site {name}: the source model {Path(model_path).name} has no quality model, so the site "
                               "could not tell whether adaptation helps; add it with python -m grata.train_source "
                               "checkpoint=<that file> (on the source's labelled data)")
        self.state = self._load_state()
        if self.state.adapter is not None:
            self.adapter.load_state_dict(self.state.adapter)
        self.refs = source_moments(self.adapter.norms)  # the source's running statistics: public
        self.min_images = max(cfg.min_images, self.limits.min_images)
        self.model = model  # the frozen source model (shared, read-only): private releases come from it
        self.strategy = cfg.strategy
        self.ledger = None
        if cfg.private:  # the site's own ledger: every private release is accounted in it before it is made
            ident = identity or {"site": name, **{k: cfg.data.get(k) for k in ("kind", "root", "size", "seed")}}
            self.ledger = Ledger(self.limits.ledger_dir, data_key(ident), cfg.accountant)
        self.strategy.setup_site(self)

    # --- state ---------------------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.state_dir / "site.pt"

    def _load_state(self) -> SiteState:
        if not self.state_file.is_file():
            return SiteState()
        try:
            raw = torch.load(self.state_file, map_location="cpu", weights_only=True)  # tensors and plain data only
            return SiteState(**{k: v for k, v in raw.items() if k in SiteState.__dataclass_fields__})
        except Exception as exc:  # noqa: BLE001
            raise RuntimeError(f"site {self.name}: cannot read its state {self.state_file}: {exc}") from exc

    def save(self) -> None:
        """Atomically: a site killed while saving keeps its previous round's state."""
        self.state.adapter = self.adapter.state_dict()
        tmp = self.state_file.with_suffix(".tmp")
        torch.save(self.state.__dict__, tmp)
        tmp.replace(self.state_file)

    # --- coordinator inputs --------------------------------------------------------------------------
    def reset_to_source(self) -> None:
        """Ordered by the coordinator: back to the source model (the privacy already spent stays spent)."""
        self.adapter.reset()
        self.state.resets += 1

    def set_pooled(self, moments: list[tuple[torch.Tensor, torch.Tensor]], weight: float | list[float]) -> None:
        """Mix the coordinator's pooled statistics in, bounded by what honest pooling could produce: each
        layer's offset from the source is clipped to clip / sqrt(L) (a mean of clipped images is never
        longer), and every share to the node config's max-pooled-weight."""
        if len(moments) != len(self.refs):
            raise ValueError(f"pooled statistics for {len(moments)} layers, the model has {len(self.refs)}")
        bound = self.cfg.clip / math.sqrt(len(self.refs))
        bounded = []
        for (m1, m2), ref in zip(moments, self.refs):
            if m1.shape != ref[0].shape or m2.shape != ref[0].shape or not (torch.isfinite(m1).all() and torch.isfinite(m2).all()):
                raise ValueError("pooled statistics do not match the source model's BN layers or are not finite")
            z = clip_relative(to_relative(m1[None].float(), m2[None].float(), ref), bound)[0]
            bounded.append(from_relative(z, ref))
        cap = self.limits.max_pooled_weight
        weight = [min(max(float(w), 0.0), cap) for w in weight] if isinstance(weight, list) else min(max(float(weight), 0.0), cap)
        self.adapter.set_pooled(bounded, weight)

    def set_affine(self, affine: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Continue from the coordinator's averaged BN affine parameters (the optimizer state is kept),
        each clipped to within max-affine-shift of the source model's (node config)."""
        if len(affine) != len(self.adapter.norms):
            raise ValueError(f"affine parameters for {len(affine)} layers, the model has {len(self.adapter.norms)}")
        shift = self.limits.max_affine_shift
        source = self.adapter.source_state
        with torch.no_grad():
            for (name, layer), (w, b) in zip(self._norm_names(), affine):
                w0, b0 = source[f"{name}.weight"], source[f"{name}.bias"]
                if w.shape != w0.shape or b.shape != b0.shape or not (torch.isfinite(w).all() and torch.isfinite(b).all()):
                    raise ValueError(f"affine parameters for layer {name} do not match the model or are not finite")
                layer.weight.copy_(torch.clamp(w, w0 - shift, w0 + shift))
                layer.bias.copy_(torch.clamp(b, b0 - shift, b0 + shift))

    def _norm_names(self) -> list[tuple[str, torch.nn.Module]]:
        by_id = {id(m): n for n, m in self.adapter.model.named_modules()}
        return [(by_id[id(layer)], layer) for layer in self.adapter.norms]

    # --- the round ---------------------------------------------------------------------------------
    def run_round(self, rnd: int, joined: int = 1) -> dict[str, Any]:
        """Adapt over this round's chunk; returns the counts (and Dice where allowed) and what the
        variant sends. joined: the site's first round (a late joiner splits its stream over the rest)."""
        if rnd == self.state.last_round and self.state.last_reply is not None:
            return self.state.last_reply  # a resumed coordinator asks again: the same answer, no new privacy cost
        if rnd <= self.state.last_round:
            raise RuntimeError(f"site {self.name}: round {rnd} was already done (state at round {self.state.last_round})")
        if not 1 <= joined <= rnd:
            raise ValueError(f"site {self.name}: asked for round {rnd} of a site that joins at round {joined}")
        torch.set_num_threads(max(1, self.cfg.threads))
        indices = chunk(len(self.dataset), self.cfg.rounds - joined + 1, rnd - joined + 1, self.min_images)
        report, steps, scores = StreamReport(), [], []
        collector = self.strategy.begin_round(self)
        t0 = time.perf_counter()
        resets_before = getattr(self.adapter, "guard_resets", 0)
        for sample in stream(self.dataset, self.cfg.data.get("on_error", "raise"), report, indices=indices):
            x = sample.image[None]
            self.strategy.prepare(self, collector, x)
            logits = self.adapter.adapt_and_predict(x)
            probs = torch.sigmoid(logits)
            steps.append(dict(self.adapter.last_step))  # holds the label-free quality estimate of what was predicted
            self.strategy.observe(self, collector, x)
            if sample.mask is not None and self.limits.report_dice:  # evaluation only: labels never reach the adapter
                scores.append({k: float(v[0]) for k, v in score(logits, sample.mask[None]).items()})
            if len(steps) == 1 and rnd > self.cfg.rounds - self.cfg.overlays:  # the last rounds' first images
                save_overlay(self.state_dir / "overlays" / f"round{rnd:02d}_{len(steps):02d}.png",
                             sample.image, probs[0], sample.mask)
        log = RoundLog(steps, time.perf_counter() - t0, getattr(self.adapter, "guard_resets", 0) - resets_before)
        metrics: dict[str, Any] = {"images": len(steps), "skipped": len(report.skipped)}
        if scores:
            for key in ("dice_disc", "dice_cup", "dice_mean"):
                metrics[key] = float(np.mean([s[key] for s in scores]))
        out: dict[str, Any] = {"metrics": metrics, "skipped": report.skipped}
        self.strategy.site_reply(self, rnd, collector, log, out)
        self.state.last_round, self.state.last_reply = rnd, out
        self.save()
        return out


__all__ = ["LimitRefused", "Site", "SiteConfig", "SiteState", "VARIANTS", "chunk", "load_source", "open_site_data", "weights_digest"]
