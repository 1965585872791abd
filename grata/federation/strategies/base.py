"""The base class of a federation variant: what a site sends, what the coordinator makes of it, what
it sends back, and how a site uses that. No Flower, no MLflow: both sides call these hooks.

One round, with the hooks in the order they run (S: at the site, C: at the coordinator):
  C broadcast(coord, site, rnd, reset, first)   per site: (array records, config values) to send it;
                                                `first`: the site's first round (a late joiner's warm start)
  S apply(site, arrays, config)                  use what came (through the site's bounded setters)
  S begin_round(site) -> collector               per-round accumulator (e.g. private statistics)
  S prepare(site, collector, x)                  every image x of the round, before the adapter sees it
  S observe(site, collector, x)                  every image x [1,3,H,W] of the round, after adaptation
  S site_reply(site, rnd, collector, log, out)   fill out["metrics"] and the variant's records
  -  the reply is audited against `allowed` on both sides (grata/federation/protocol.py)
  C accept(coord, reply, metrics) -> parsed      parse and check the variant's records (raise if unusable)
  C admit(coord, site, parsed, metrics, flagged) -> item or None: what enters this round's aggregation
  C aggregate(coord, items)                      {site: item} -> coord.state (what the next broadcast reads)

What the hooks may use. At the site: site.cfg (SiteConfig; site.cfg.strategy_options are this
variant's settings), site.adapter, site.refs (the source's BN moments, per layer (mean, var)),
site.limits (the site's own node-config limits), site.min_images, site.ledger (private variants),
site.model (the frozen source model) and the bounded setters site.set_pooled / site.set_affine,
which clip whatever arrives to what the site's limits allow: a variant cannot weaken them. At the
coordinator: coord.cfg (FederationConfig; coord.cfg.options), coord.refs, coord.state (this variant's
own state: tensors and plain data only, saved after every round and restored on resume).

A private variant (`private = True`) sends nothing data-dependent un-noised: its site keeps a
ledger, the site's limits on epsilon, delta and noise apply, and its reply must carry the "privacy"
record. Private releases go through grata/privacy.py and grata/ledger.py (see fed_stats.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import numpy as np
import torch

from grata.federation.protocol import PLAIN_METRICS, PRIVACY_KEYS, SITE_KEYS, PerLayer, Rules
from grata.geometry import crop_summary
from grata.proxy import alignment_summary

Arrays = dict[str, dict[str, torch.Tensor]]  # array records: {record: {"<layer>.<name>": tensor}}


@dataclass
class RoundLog:
    """What a site's round produced, before anything is chosen to leave."""
    steps: list[dict[str, Any]]  # the adapter's last_step per image (quality, fallback, alignment, lr, ...)
    seconds: float
    guard_resets: int

    def per_image(self) -> list[dict[str, float]]:
        """Each image's label-free Dice estimate and whether it fell back to the source model."""
        return [{"dice_proxy": s["quality"], "fallback_share": s["fallback"]} for s in self.steps]

    def plain_metrics(self) -> dict[str, Any]:
        """The exact (un-noised) round summary: time, resets, proxy and fallback means, alignment summary,
        crop protocol (share cropped, median zoom)."""
        out: dict[str, Any] = {"seconds": self.seconds, "guard_resets": self.guard_resets}
        per_image = self.per_image()
        for key in per_image[0] if per_image else ():
            out[key] = float(np.mean([p[key] for p in per_image]))
        out.update(alignment_summary(self.steps))
        out.update(crop_summary(self.steps))  # the site's crop protocol, with the geometry step on
        return out


class Strategy:
    """A federation variant. Subclasses set `name`, `metrics` and `arrays`, and override the hooks
    they need; the defaults are local_only's: plain metrics out, nothing aggregated, nothing back."""
    name: ClassVar[str] = ""
    private: ClassVar[bool] = False
    metrics: ClassVar[set[str]] = PLAIN_METRICS  # the metric keys a site may send
    arrays: ClassVar[dict[str, PerLayer]] = {}  # the array records a site may send
    options: ClassVar[dict[str, Any]] = {}  # this variant's settings (federation.options) and their defaults

    @property
    def allowed(self) -> Rules:
        """Every record and key a reply may hold (the audit's list)."""
        return {"site": SITE_KEYS, "metrics": self.metrics, **({"privacy": PRIVACY_KEYS} if self.private else {}),
                **self.arrays}

    @property
    def required(self) -> Rules:
        """Records that, when present, must hold exactly these keys."""
        return {"privacy": PRIVACY_KEYS} if self.private else {}

    def settings(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """This variant's settings: its defaults, overridden by the keys of `options` it declares
        (federation.options is shared by every variant a comparison runs; check_options rejects
        keys no variant declares)."""
        return {**self.options, **{k: v for k, v in options.items() if k in self.options}}

    # --- at the site ----------------------------------------------------------------------------------
    def setup_site(self, site) -> None:
        """Once per Site object (one process), after its limits and model are checked."""

    def apply(self, site, arrays: Arrays, config: Mapping[str, Any]) -> None:
        """Use what the coordinator broadcast to this site (before the round's images)."""

    def begin_round(self, site) -> Any:
        """A per-round accumulator handed to observe and site_reply (None: nothing to accumulate)."""
        return None

    def prepare(self, site, collector: Any, x: torch.Tensor) -> None:
        """Every image x [1,3,H,W] of the round, before the adapter sees it (e.g. a decision for this image)."""

    def observe(self, site, collector: Any, x: torch.Tensor) -> None:
        """Every image x [1,3,H,W] of the round, after the adapter has seen it."""

    def site_reply(self, site, rnd: int, collector: Any, log: RoundLog, out: dict[str, Any]) -> None:
        """Fill `out`: out["metrics"] holds the counts (and Dice where allowed); add what the variant
        sends. A plain variant sends the exact summary (docs/privacy.md: not covered by any epsilon)."""
        out["metrics"].update(log.plain_metrics())

    @staticmethod
    def may_release(site, rnd: int, sigmas: Mapping[str, float], count: int, out: dict[str, Any]) -> bool:
        """A private release's gate, the same for every private variant: enough images this round and
        budget left under the site's own max-epsilon; when it opens, the round is accounted in the
        site's ledger first, before anything is computed to leave. Otherwise `out["status"]` says why."""
        if count < site.min_images:
            out["status"] = "below_min_images" if count else "ok"
            return False
        if site.ledger.would_spend(list(sigmas.values()), site.cfg.delta) > site.limits.max_epsilon * (1 + 1e-9):
            out["status"] = "budget_exhausted"  # the site keeps adapting and says why it releases nothing
            print(f"site {site.name}: privacy budget max-epsilon {site.limits.max_epsilon:g} would be exceeded; "
                  f"nothing released from round {rnd} on", flush=True)
            return False
        site.ledger.record(list(sigmas.values()))
        return True

    # --- at the coordinator -----------------------------------------------------------------------------
    def accept(self, coord, reply: Mapping[str, Mapping[str, Any]], metrics: dict[str, float]) -> Any:
        """Parse and check the variant's records of an audited reply; raise ValueError if unusable."""
        return None

    def admit(self, coord, site: str, parsed: Any, metrics: dict[str, float], flagged: bool) -> Any:
        """What of an accepted reply enters this round's aggregation (None: nothing)."""
        return parsed

    def aggregate(self, coord, items: dict[str, Any]) -> None:
        """After a round's replies: {site: admitted item} -> coord.state."""

    def broadcast(self, coord, site: str, rnd: int, reset: bool, first: bool) -> tuple[Arrays, dict[str, Any]]:
        """What `site` gets in round `rnd`: (array records, config values). `reset`: the site is ordered
        back to the source model this round; `first`: it is the site's first round (a newcomer)."""
        return {}, {}

    def round_means(self, coord) -> dict[str, float]:
        """Round-level figures for the run's series (e.g. the signal the privacy noise left)."""
        return {}


__all__ = ["Arrays", "RoundLog", "Strategy"]
