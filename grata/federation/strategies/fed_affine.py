"""fed_affine: sites also send their adapted BN affine parameters; the coordinator averages them
after each round (by image count, or `affine_weighting=alignment`: by image count x (1 + mean
gradient cosine)^2 / 4; robustly with `aggregation=median|trimmed_mean`) and every site continues
from the average, clipped to within its node config's max-affine-shift of the source's."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from grata.adapters.grata import cus
from grata.federation.protocol import MAX_IMAGES, PerLayer, layer_arrays, layer_tensors
from grata.federation.strategies.base import Arrays, RoundLog, Strategy
from grata.privacy import robust_mean

NAMES = ("weight", "bias")
Layers = list[tuple[torch.Tensor, torch.Tensor]]  # per BN layer (weight [C], bias [C])


class FedAffine(Strategy):
    name = "fed_affine"
    arrays = {"affine": PerLayer(NAMES)}

    # --- at the site ----------------------------------------------------------------------------------
    def apply(self, site, arrays: Arrays, config: Mapping[str, Any]) -> None:
        if "affine" in arrays:
            site.set_affine(layer_tensors(arrays["affine"], NAMES))

    def site_reply(self, site, rnd: int, collector: Any, log: RoundLog, out: dict[str, Any]) -> None:
        super().site_reply(site, rnd, collector, log, out)
        out["affine"] = layer_arrays([(n.weight, n.bias) for n in site.adapter.norms], NAMES)

    # --- at the coordinator -----------------------------------------------------------------------------
    def accept(self, coord, reply, metrics: dict[str, float]) -> Layers:
        """The site's affine parameters must match the source model layer by layer."""
        layers = layer_tensors(reply["affine"], NAMES)
        if len(layers) != len(coord.refs) or any(w.shape != ref[0].shape or b.shape != ref[0].shape
                                                 for (w, b), ref in zip(layers, coord.refs)):
            raise ValueError("affine parameters do not match the source model's BN layers")
        return layers

    def admit(self, coord, site: str, parsed: Layers, metrics: dict[str, float], flagged: bool):
        """(layers, weight); a drifting (flagged) site's parameters are not averaged in."""
        return None if flagged else (parsed, self.weight(coord, metrics))

    def weight(self, coord, metrics: dict[str, float]) -> float:
        n = float(min(max(metrics.get("images", 0), 0), MAX_IMAGES))  # the protocol's cap, whatever a site claims
        if str(getattr(coord.cfg.affine_weighting, "value", coord.cfg.affine_weighting)) == "alignment" \
                and "align_cos_mean" in metrics:
            return n * cus(metrics["align_cos_mean"])
        return n

    def aggregate(self, coord, items: dict[str, tuple[Layers, float]]) -> None:
        """site -> (per-layer (weight, bias), aggregation weight) -> coord.state["affine"]."""
        if not items:
            return
        if sum(w for _, w in items.values()) <= 0:  # every site's gradients conflicted: fall back to plain weights
            items = {k: (layers, 1.0) for k, (layers, _) in items.items()}
        weights = torch.tensor([w for _, w in items.values()], dtype=torch.float64)
        n_layers = len(next(iter(items.values()))[0])
        coord.state["affine"] = [tuple(robust_mean(torch.stack([layers[i][j].double() for layers, _ in items.values()]),
                                                   coord.cfg.aggregation, coord.cfg.trim, weights).float() for j in (0, 1))
                                 for i in range(n_layers)]

    def broadcast(self, coord, site: str, rnd: int, reset: bool, first: bool) -> tuple[Arrays, dict[str, Any]]:
        """The average so far, to every site not being reset (a newcomer starts from it)."""
        affine = coord.state.get("affine")
        return ({"affine": layer_arrays(affine, NAMES)} if affine is not None and not reset else {}), {}


__all__ = ["FedAffine"]
