"""The coordinator's decisions, free of Flower and MLflow: site health, pooling and averaging.

Per round it takes each site's accepted reply and returns what every site gets next round:
pooled BN statistics (fed_stats), averaged BN affine parameters (fed_affine), and reset orders for
sites whose label-free Dice proxy fell more than `proxy_margin` below their best so far, or whose
adaptation the site itself judged worse than the source model on most images (`fallback_share`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from client.protocol import MAX_IMAGES
from grata.adapters.grata import cus
from grata.kin import LOG_SHIFT_MAX, KinRow, accumulate, release_std
from grata.privacy import pool, robust_mean
from server.config import AffineWeighting, FederationConfig, Variant


@dataclass
class SiteRecord:
    name: str
    rounds: list[dict[str, float]] = field(default_factory=list)  # metrics per completed round
    best_proxy: float | None = None
    flagged: list[int] = field(default_factory=list)  # rounds where the proxy fell past the margin
    failures: list[int] = field(default_factory=list)  # rounds without a usable reply
    reset_next: bool = False


@dataclass
class Coordinator:
    cfg: FederationConfig
    refs: list[tuple[torch.Tensor, torch.Tensor]]  # the source's per-layer BN (mean, var): public
    sites: dict[str, SiteRecord] = field(default_factory=dict)
    releases: list[tuple[list[torch.Tensor], int, float]] = field(default_factory=list)
    release_sites: list[str] = field(default_factory=list)  # the site of each release (robust pooling)
    pooled: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    pooled_kept: list[float] = field(default_factory=list)
    affine: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    kin_sigma: float = 0.0  # fed_kin: the noise multiplier of the released stem shift (known to both sides)
    kin: dict[str, list[tuple[float, int, float]]] = field(default_factory=dict)  # site -> (noisy mean, images, std) per release

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

    def check_release(self, sums: list[torch.Tensor], count: int, noise_std: float) -> None:
        """Released statistics must match the source model layer by layer, from > 0 images, with noise."""
        if len(sums) != len(self.refs) or any(s.shape != (2 * ref[0].numel(),) for s, ref in zip(sums, self.refs)):
            raise ValueError("released statistics do not match the source model's BN layers")
        if not 0 < count <= MAX_IMAGES or not noise_std > 0:
            raise ValueError(f"a release needs 1..{MAX_IMAGES} images (got {count}) and noise (std {noise_std})")

    def add_release(self, sums: list[torch.Tensor], count: int, noise_std: float, site: str = "") -> None:
        self.check_release(sums, count, noise_std)
        self.releases.append((sums, count, noise_std))
        self.release_sites.append(site)

    def check_kin(self, metrics: dict[str, float]) -> tuple[float, int, float] | None:
        """fed_kin: a released stem shift must come with the noise the run's sigma gives for its image count,
        and lie where an honest noisy mean can (the bounds, widened by 8 noise stds). None: nothing released."""
        if not metrics.get("dp_released"):
            return None
        if "stem_shift" not in metrics or "stats_images" not in metrics:
            raise ValueError("a fed_kin release needs stem_shift and stats_images")
        n = int(metrics["stats_images"])
        if not 0 < n <= MAX_IMAGES:
            raise ValueError(f"a fed_kin release needs 1..{MAX_IMAGES} images (got {n})")
        want = release_std(self.kin_sigma, n)
        std, value = float(metrics["dp_noise_std"]), float(metrics["stem_shift"])
        if not math.isclose(std, want, rel_tol=1e-6):
            raise ValueError(f"stem_shift noise std {std:g} is not the run's {want:g} for {n} images")
        if not -8 * want <= value <= LOG_SHIFT_MAX + 8 * want:
            raise ValueError(f"stem_shift {value:g} lies outside what a noisy mean of [0, {LOG_SHIFT_MAX}] can be")
        return value, n, std

    def add_kin(self, name: str, release: tuple[float, int, float]) -> None:
        self.kin.setdefault(name, []).append(release)

    def kin_rows(self, exclude: str) -> list[KinRow]:
        """Every other site's evidence so far (post-processing of noised releases: no privacy cost)."""
        return [accumulate(r) for s, r in sorted(self.kin.items()) if s != exclude and r]

    def check_affine(self, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """A site's BN affine parameters must match the source model layer by layer, finite."""
        if len(layers) != len(self.refs) or any(w.shape != ref[0].shape or b.shape != ref[0].shape
                                                for (w, b), ref in zip(layers, self.refs)):
            raise ValueError("affine parameters do not match the source model's BN layers")

    def end_round(self, affine: dict[str, tuple[list[tuple[torch.Tensor, torch.Tensor]], float]]) -> None:
        """After a round's replies: pool all releases so far; average this round's affine parameters.

        affine: site -> (per-layer (weight, bias), aggregation weight), from sites not being reset.
        """
        how = self.cfg.aggregation
        if self.cfg.variant == Variant.fed_stats and self.releases:
            self.pooled, self.pooled_kept = pool(self.releases, self.refs, self.release_sites, how, self.cfg.trim)
        if self.cfg.variant == Variant.fed_affine and affine:
            total = sum(w for _, w in affine.values())
            if total <= 0:  # every site's gradients conflicted: fall back to plain weights
                affine = {k: (layers, 1.0) for k, (layers, _) in affine.items()}
            weights = torch.tensor([w for _, w in affine.values()], dtype=torch.float64)
            n_layers = len(next(iter(affine.values()))[0])
            self.affine = [tuple(robust_mean(torch.stack([layers[i][j].double() for layers, _ in affine.values()]),
                                             how, self.cfg.trim, weights).float() for j in (0, 1))
                           for i in range(n_layers)]

    def affine_weight(self, metrics: dict[str, float]) -> float:
        n = float(min(max(metrics.get("images", 0), 0), MAX_IMAGES))  # the protocol's cap, whatever a site claims
        if self.cfg.affine_weighting == AffineWeighting.alignment and "align_cos_mean" in metrics:
            return n * cus(metrics["align_cos_mean"])
        return n


__all__ = ["Coordinator", "SiteRecord"]
