"""fed_stats: sites release differentially private BN input statistics of a frozen source-model pass
(and the noised Dice proxy mean) under their own ledger; the coordinator pools every release so far
and each site mixes the pooled statistics into its BN layers, per layer with share pooled_weight x
the share of that layer's pooled signal the privacy noise left (docs/privacy.md)."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from grata.federation.protocol import MAX_IMAGES, PRIVATE_METRICS, PerLayer, layer_arrays, layer_tensors
from grata.federation.strategies.base import Arrays, RoundLog, Strategy
from grata.privacy import SCALAR_FIELDS, PrivateMoments, PrivateScalars, SourcePass, pool, split

STATS = PerLayer(("sum",), per_channel=2)  # the noisy source-relative moment sums [2C] of each layer
POOLED = ("m1", "m2")
Release = tuple[list[torch.Tensor], int, float]  # per-layer noisy sums [2C], image count, noise std


class FedStats(Strategy):
    name = "fed_stats"
    private = True
    metrics = PRIVATE_METRICS
    arrays = {"stats": STATS}

    # --- at the site ----------------------------------------------------------------------------------
    def setup_site(self, site) -> None:
        # the released statistics come from the frozen source model, one image at a time: one
        # image's contribution cannot depend on another image or on the adaptation state
        site.source_pass = SourcePass(site.model)

    def apply(self, site, arrays: Arrays, config: Mapping[str, Any]) -> None:
        if "pooled" in arrays:
            weights = config.get("pooled_weights")  # per layer: the share the privacy noise left as signal
            site.set_pooled(layer_tensors(arrays["pooled"], POOLED),
                            [float(w) for w in weights] if weights is not None else float(config["pooled_weight"]))

    def begin_round(self, site) -> PrivateMoments:
        return PrivateMoments(site.refs, site.cfg.clip, 1.0)

    def observe(self, site, collector: PrivateMoments, x: torch.Tensor) -> None:
        collector.add(site.source_pass.moments(x))

    def site_reply(self, site, rnd: int, stats: PrivateMoments, log: RoundLog, out: dict[str, Any]) -> None:
        """The release: noised statistics and proxy mean, accounted in the site's ledger first. The
        alignment summary, timings and the proxy's parts are not sent."""
        cfg = site.cfg
        # one round's budget, split: BN statistics, and each declared per-image scalar field equally
        fields = list(SCALAR_FIELDS)
        shares = {"stats": 1 - cfg.metrics_share, **{f: cfg.metrics_share / len(fields) for f in fields}}
        sigmas = split(cfg.noise_multiplier, shares)
        released, proxy_std = False, 0.0
        if self.may_release(site, rnd, sigmas, stats.count, out):
            stats.noise_multiplier = sigmas["stats"]
            sums, out["metrics"]["stats_images"] = stats.release()
            out["stats"] = layer_arrays([(s,) for s in sums], STATS.names)
            scalars = PrivateScalars({f: sigmas[f] for f in fields})
            for per_image in log.per_image():
                for f in fields:
                    scalars.add(f, per_image[f])
            for f, (mean, std) in scalars.release().items():
                out["metrics"][f] = mean
                if f == "dice_proxy":
                    proxy_std = std
            released = True
        out["privacy"] = {"dp_epsilon": site.ledger.spent(cfg.delta), "dp_delta": cfg.delta,
                          "dp_noise_std": stats.noise_multiplier * stats.sensitivity if released else 0.0,
                          "dp_proxy_std": proxy_std, "dp_released": float(released)}

    # --- at the coordinator -----------------------------------------------------------------------------
    def accept(self, coord, reply, metrics: dict[str, float]) -> Release | None:
        """Released statistics must match the source model layer by layer, from > 0 images, with noise."""
        if "stats" not in reply:
            return None  # nothing released this round (too few images, or the site's budget is spent)
        sums = [s[0] for s in layer_tensors(reply["stats"], STATS.names)]
        count, noise_std = int(metrics["stats_images"]), float(metrics["dp_noise_std"])
        if len(sums) != len(coord.refs) or any(s.shape != (2 * ref[0].numel(),) for s, ref in zip(sums, coord.refs)):
            raise ValueError("released statistics do not match the source model's BN layers")
        if not 0 < count <= MAX_IMAGES or not noise_std > 0:
            raise ValueError(f"a release needs 1..{MAX_IMAGES} images (got {count}) and noise (std {noise_std})")
        return sums, count, noise_std

    def admit(self, coord, site: str, parsed: Release | None, metrics: dict[str, float], flagged: bool):
        return parsed  # a private release is pooled whatever the proxy says (the proxy is noised)

    def aggregate(self, coord, items: dict[str, Release]) -> None:
        """Pool every release so far (robust pooling gives each site one vote)."""
        releases, sites = coord.state.setdefault("releases", []), coord.state.setdefault("release_sites", [])
        for site, release in items.items():
            releases.append(release)
            sites.append(site)
        if releases:
            coord.state["pooled"], coord.state["pooled_kept"] = pool(releases, coord.refs, sites,
                                                                     coord.cfg.aggregation, coord.cfg.trim)

    def broadcast(self, coord, site: str, rnd: int, reset: bool, first: bool) -> tuple[Arrays, dict[str, Any]]:
        """The pooled statistics, to every site (a newcomer too); each layer's share shrinks with the
        signal that survived the privacy noise (noise-only statistics would pull sites to the source's)."""
        config: dict[str, Any] = {"pooled_weight": coord.cfg.pooled_weight}
        pooled = coord.state.get("pooled")
        if pooled is None:
            return {}, config
        config["pooled_weights"] = [coord.cfg.pooled_weight * k for k in coord.state["pooled_kept"]]
        return {"pooled": layer_arrays(pooled, POOLED)}, config

    def round_means(self, coord) -> dict[str, float]:
        kept = coord.state.get("pooled_kept")
        return {"dp_signal_kept": sum(kept) / len(kept)} if kept else {}


__all__ = ["FedStats"]
