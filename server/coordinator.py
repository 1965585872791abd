"""The coordinator's decisions, free of Flower and MLflow: site health, and the variant's state.

Per round it takes each site's accepted reply; the variant's strategy (grata/federation/strategies/)
aggregates what the sites sent into `state` and says what every site gets next round (pooled BN
statistics, averaged BN affine parameters, ...). The coordinator itself tracks site health and
orders back to the source model sites whose label-free Dice proxy fell more than `proxy_margin`
below their best so far, or whose adaptation the site itself judged worse than the source model on
most images (`fallback_share`), when `reset_on_drop` is set.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from grata.federation.strategies import Strategy, get_strategy
from server.config import FederationConfig


@dataclass
class SiteRecord:
    name: str
    rounds: list[dict[str, float]] = field(default_factory=list)  # metrics per completed round
    best_proxy: float | None = None
    flagged: list[int] = field(default_factory=list)  # rounds where the proxy fell past the margin
    failures: list[int] = field(default_factory=list)  # rounds without a usable reply
    reset_next: bool = False
    joined: int = 0  # the round the site was first asked to adapt in (0: not yet)


@dataclass
class Coordinator:
    cfg: FederationConfig
    refs: list[tuple[torch.Tensor, torch.Tensor]]  # the source's per-layer BN (mean, var): public
    sites: dict[str, SiteRecord] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)  # the variant's own: tensors and plain data (saved each round)

    @property
    def strategy(self) -> Strategy:
        return get_strategy(self.cfg.variant.value)

    def site(self, name: str) -> SiteRecord:
        return self.sites.setdefault(name, SiteRecord(name))

    def record_failure(self, name: str, rnd: int) -> None:
        self.site(name).failures.append(rnd)

    def observe(self, name: str, rnd: int, metrics: dict[str, float]) -> bool:
        """Track a site's proxy; True when it fell more than the margin below its best (flagged)."""
        rec = self.site(name)
        rec.rounds.append({"round": rnd, **metrics})
        proxy = metrics.get("dice_proxy")
        if proxy is None:
            return False
        # a noised proxy (fed_stats) flags only a drop the privacy noise cannot explain (3 sigma of a difference)
        margin = self.cfg.proxy_margin + 3 * 2**0.5 * float(metrics.get("dp_proxy_std", 0.0))
        fell_back = metrics.get("fallback_share", 0.0) > self.cfg.fallback_flag
        if fell_back or rec.best_proxy is not None and proxy < rec.best_proxy - margin:
            rec.flagged.append(rnd)
            if self.cfg.reset_on_drop:
                rec.reset_next = True
                rec.best_proxy = None  # after the reset the site is measured afresh
            return True
        rec.best_proxy = proxy if rec.best_proxy is None else max(rec.best_proxy, proxy)
        return False

    def take_reset(self, name: str) -> bool:
        """Whether this site is ordered back to the source model in the next round (asked once)."""
        rec = self.site(name)
        order, rec.reset_next = rec.reset_next, False
        return order

    def end_round(self, items: dict[str, Any]) -> None:
        """After a round's replies: the variant aggregates what was admitted, {site: item}."""
        self.strategy.aggregate(self, items)


__all__ = ["Coordinator", "SiteRecord"]
