"""What a site allows, set by the site (node config), never by the coordinator.

Node config keys (`flower-supernode --node-config`); a deployed site (one naming its own data with
`data-root` or `domain`) must set the first six, and the site refuses to start without them:
  max-epsilon           the most epsilon its ledger may ever reach for this data, over all runs
  max-delta             the largest delta it accepts
  min-noise-multiplier  the least effective noise multiplier it accepts (sigma of calibrate())
  min-images            the fewest images in one release (the site chunks its stream accordingly)
  ledger-dir            where its privacy ledger lives (outside any run or state folder)
  source-digest         the sha256 digest of the only source model it runs: its weights and the
                        metadata it acts on (shift unit, quality model, geometry reference)
  report-dice           optional, default false: send labelled Dice (evaluation only, outside the DP claim)
  private-only          optional, default false: refuse the variants that share un-noised values
  max-pooled-weight     optional, default 0.5: the largest share of pooled statistics it mixes in
  max-affine-shift      optional, default 0.25: how far (absolute) averaged BN affine parameters may
                        move from the source's before they are clipped back
In simulation (no data in the node config) the operator runs every site: missing keys fall back to
what the run's configuration asks, and the ledger lives in the run's site folder.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

REQUIRED = ("max-epsilon", "max-delta", "min-noise-multiplier", "min-images", "ledger-dir", "source-digest")


class LimitRefused(ValueError):
    """The coordinator asked for more than the site's node config allows."""


def _flag(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class SiteLimits:
    max_epsilon: float
    max_delta: float
    min_noise_multiplier: float
    min_images: int
    ledger_dir: Path
    source_digest: str | None = None
    report_dice: bool = False
    private_only: bool = False
    max_pooled_weight: float = 0.5
    max_affine_shift: float = 0.25

    def __post_init__(self) -> None:
        if not (self.max_epsilon > 0 and 0 < self.max_delta < 1 and self.min_noise_multiplier >= 0
                and self.min_images >= 1 and 0 <= self.max_pooled_weight <= 1 and self.max_affine_shift >= 0):
            raise ValueError(f"node config: need max-epsilon > 0, 0 < max-delta < 1, min-noise-multiplier >= 0, "
                             f"min-images >= 1, 0 <= max-pooled-weight <= 1, max-affine-shift >= 0; got {self}")

    @classmethod
    def from_node(cls, node: Mapping[str, Any], deployed: bool, asked: Any, sim_ledger: Path) -> "SiteLimits":
        """From the node config; `asked` (a SiteConfig) fills the gaps in simulation only."""
        if deployed:
            missing = [k for k in REQUIRED if k not in node]
            if missing:
                raise ValueError(f"node config is missing {missing}: a deployed site sets its own privacy limits "
                                 f"({', '.join(REQUIRED)}); see docs/privacy.md")
        get = lambda key, default: node[key] if key in node else default  # noqa: E731 - a lookup, named
        try:
            return cls(max_epsilon=float(get("max-epsilon", asked.epsilon)), max_delta=float(get("max-delta", asked.delta)),
                       min_noise_multiplier=float(get("min-noise-multiplier", 0.0)),
                       min_images=int(get("min-images", asked.min_images)),
                       ledger_dir=Path(str(get("ledger-dir", sim_ledger))),
                       source_digest=str(node["source-digest"]) if "source-digest" in node else None,
                       report_dice=_flag(get("report-dice", not deployed and asked.report_dice)),
                       private_only=_flag(get("private-only", False)),
                       max_pooled_weight=float(get("max-pooled-weight", 0.5)),
                       max_affine_shift=float(get("max-affine-shift", 0.25)))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"node config: {exc}") from exc

    def check(self, asked: Any) -> None:
        """Refuse a round whose privacy parameters exceed these limits (clear error, nothing computed)."""
        private = asked.private  # the variant's own declaration (grata/federation/strategies/)
        if self.private_only and not private:
            raise LimitRefused(f"variant {asked.variant} shares un-noised values; this site's node config sets private-only")
        if not private:
            return
        if asked.epsilon > self.max_epsilon * (1 + 1e-9):
            raise LimitRefused(f"coordinator asks epsilon {asked.epsilon:g}; node config max-epsilon is {self.max_epsilon:g}")
        if asked.delta > self.max_delta * (1 + 1e-9):
            raise LimitRefused(f"coordinator asks delta {asked.delta:g}; node config max-delta is {self.max_delta:g}")
        if asked.noise_multiplier < self.min_noise_multiplier * (1 - 1e-9):
            raise LimitRefused(f"coordinator asks noise multiplier {asked.noise_multiplier:g}; node config "
                               f"min-noise-multiplier is {self.min_noise_multiplier:g}")

    def check_digest(self, digest: str) -> None:
        if self.source_digest is not None and digest != self.source_digest:
            raise LimitRefused(f"source model digest {digest[:12]}... is not the one pinned in the node config "
                               f"({self.source_digest[:12]}...)")


__all__ = ["LimitRefused", "REQUIRED", "SiteLimits"]
