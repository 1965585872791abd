"""fed_kin: sites like a newcomer confirm its shift, so it leaves the source's BN statistics at once.

Why (measured, docs/federation_scenarios.md): under `bn=auto` a site keeps the source's statistics
for its first `auto_warmup` images; on a large acquisition shift those images score ~35-50 Dice
instead of ~87, and that is what a hospital joining a running federation pays. Adapted BN affine
parameters barely move over a few dozen images (fed_affine == local_only), and pooled statistics
drown in the privacy noise, so the shareable thing that pays is the *evidence* of a shift.

Site: each round it releases, under its one ledger, the noised mean over its images of
log(1 + stem shift ratio) (one number, from the frozen source model: sensitivity LOG_SHIFT_MAX) and
the noised proxy mean (as fed_stats). Before each image it compares that image's exact shift (never
released) with the rows the coordinator broadcast; when sites of matching shift confirm, through
their noise, a shift above the switch threshold, it switches to image statistics now (grata/kin.py).
Coordinator: checks each release's noise against the run's own sigma and its value against what a
noisy mean of [0, LOG_SHIFT_MAX] can be, keeps every site's releases, and broadcasts to each site the
other sites' accumulated rows (post-processing of noised releases: no further privacy cost).
No matching row (every site a different device; round 1): the site adapts exactly as in local_only.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from grata.federation.protocol import MAX_IMAGES, PRIVATE_METRICS
from grata.federation.strategies.base import Arrays, RoundLog, Strategy
from grata.kin import KIN_FIELDS, LOG_SHIFT_MAX, KinRow, accumulate, confirms, log_shift, release_std
from grata.privacy import SCALAR_FIELDS, PrivateScalars, SourcePass, split

MAX_ROWS = 1024  # rows a site reads from one broadcast: a coordinator cannot make it do unbounded work
Release = tuple[float, int, float]  # noisy mean log shift, images, noise std of that mean


def shift_sigma(noise_multiplier: float, metrics_share: float) -> float:
    """The stem shift's noise multiplier: the round's budget less the proxy's share (grata/privacy.split)."""
    return noise_multiplier / math.sqrt(1 - metrics_share)


class FedKin(Strategy):
    name = "fed_kin"
    private = True
    metrics = PRIVATE_METRICS | {"stem_shift"}  # + the noised mean log stem shift

    # --- at the site ----------------------------------------------------------------------------------
    def setup_site(self, site) -> None:
        site.source_pass = SourcePass(site.model)  # the stem's input depends on the image alone
        site.kin = []

    def apply(self, site, arrays: Arrays, config: Mapping[str, Any]) -> None:
        """The other sites' rows; rows no honest coordinator could send (NaN, std <= 0, ...) are dropped."""
        if "kin_mean" not in config:
            return
        cols = [list(config[k]) for k in ("kin_mean", "kin_count", "kin_std")]
        if len({len(c) for c in cols}) != 1:
            raise ValueError("fed_kin rows: kin_mean, kin_count and kin_std differ in length")
        rows = [KinRow(float(m), int(n), float(s)) for m, n, s in zip(*cols)][:MAX_ROWS]
        site.kin = [r for r in rows if r.valid() and r.count <= MAX_IMAGES]

    def begin_round(self, site) -> list[float]:
        return []  # each image's log stem shift, released only as a noised mean

    def prepare(self, site, shifts: list[float], x: torch.Tensor) -> None:
        adapter = site.adapter
        stem = site.source_pass.moments(x, first=1)[0]  # the stem's input: the forward stops there
        shift = log_shift(adapter.stem_ratio(*stem)) if adapter.shift_reference else 0.0
        shifts.append(shift)
        if site.kin and confirms(shift, site.kin, adapter.shift_threshold, adapter.auto_warmup):
            adapter.adopt_image_statistics()  # a no-op unless bn=auto has not switched yet

    def site_reply(self, site, rnd: int, shifts: list[float], log: RoundLog, out: dict[str, Any]) -> None:
        """The release: noised mean stem shift and proxy mean, accounted in the site's ledger first."""
        cfg = site.cfg
        sigmas = split(cfg.noise_multiplier, {"stem_shift": 1 - cfg.metrics_share, "dice_proxy": cfg.metrics_share})
        stds, released = {"stem_shift": 0.0, "dice_proxy": 0.0}, False
        if self.may_release(site, rnd, sigmas, len(shifts), out):
            scalars = PrivateScalars(sigmas, bounds={**SCALAR_FIELDS, **KIN_FIELDS})
            for shift, per_image in zip(shifts, log.per_image()):
                scalars.add("stem_shift", shift)
                scalars.add("dice_proxy", per_image["dice_proxy"])
            for f, (mean, std) in scalars.release().items():
                out["metrics"][f], stds[f] = mean, std
            out["metrics"]["stats_images"] = len(shifts)
            released = True
        out["privacy"] = {"dp_epsilon": site.ledger.spent(cfg.delta), "dp_delta": cfg.delta,
                          "dp_noise_std": stds["stem_shift"], "dp_proxy_std": stds["dice_proxy"],
                          "dp_released": float(released)}

    # --- at the coordinator -----------------------------------------------------------------------------
    def accept(self, coord, reply, metrics: dict[str, float]) -> Release | None:
        """A release must carry the noise the run's sigma gives for its image count, and a value an honest
        noisy mean of [0, LOG_SHIFT_MAX] can take (8 noise stds around the bounds)."""
        if not metrics.get("dp_released"):
            return None  # nothing released this round (too few images, or the site's budget is spent)
        if "stem_shift" not in metrics or "stats_images" not in metrics:
            raise ValueError("a fed_kin release needs stem_shift and stats_images")
        n = int(metrics["stats_images"])
        if not 0 < n <= MAX_IMAGES:
            raise ValueError(f"a fed_kin release needs 1..{MAX_IMAGES} images (got {n})")
        run = coord.state.get("privacy")
        if run is None:
            raise ValueError("fed_kin: the coordinator does not know the run's noise multiplier")
        want = release_std(shift_sigma(run["noise_multiplier"], run["metrics_share"]), n)
        std, value = float(metrics["dp_noise_std"]), float(metrics["stem_shift"])
        if not math.isclose(std, want, rel_tol=1e-6):
            raise ValueError(f"stem_shift noise std {std:g} is not the run's {want:g} for {n} images")
        if not -8 * want <= value <= LOG_SHIFT_MAX + 8 * want:
            raise ValueError(f"stem_shift {value:g} lies outside what a noisy mean of [0, {LOG_SHIFT_MAX:g}] can be")
        return value, n, std

    def admit(self, coord, site: str, parsed: Release | None, metrics: dict[str, float], flagged: bool):
        return parsed  # evidence of a shift, whatever the (noised) proxy says

    def aggregate(self, coord, items: dict[str, Release]) -> None:
        releases = coord.state.setdefault("kin", {})
        for site, release in items.items():
            releases.setdefault(site, []).append(release)

    def rows(self, coord, exclude: str) -> list[KinRow]:
        """Every other site's evidence so far: never a site's own (it holds its exact values)."""
        return [accumulate(r) for s, r in sorted(coord.state.get("kin", {}).items()) if s != exclude and r]

    def broadcast(self, coord, site: str, rnd: int, reset: bool, first: bool) -> tuple[Arrays, dict[str, Any]]:
        rows = self.rows(coord, exclude=site)
        if not rows:
            return {}, {}
        return {}, {"kin_mean": [r.mean for r in rows], "kin_count": [r.count for r in rows],
                    "kin_std": [r.std for r in rows]}

    def round_means(self, coord) -> dict[str, float]:
        return {"kin_sites": float(len(coord.state.get("kin", {})))}


__all__ = ["FedKin", "shift_sigma"]
