"""What the coordinator tells every site, and how both sides name the source model. No Flower here.

The coordinator builds one SiteConfig per run and sends it as JSON with every message; the site
checks it against its own limits (client/limits.py) before any work.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from grata.config import DataConfig, open_domain
from grata.federation.strategies import STRATEGIES, Strategy, get_strategy
from grata.models import ResUNet, load_checkpoint


@dataclass
class SiteConfig:
    """What the coordinator tells every site (sent as JSON in the round's ConfigRecord)."""
    data: dict[str, Any]
    adapter: str
    options: dict[str, Any]
    variant: str = "local_only"
    rounds: int = 4
    seed: int = 0
    threads: int = 1
    overlays: int = 2  # predictions drawn per site, kept in its own folder
    clip: float = 1.0
    noise_multiplier: float = 1.0
    epsilon: float = 8.0
    delta: float = 1e-5
    accountant: str = "rdp"
    min_images: int = 2  # fewest images per release asked for; the site's own min-images can only raise it
    metrics_share: float = 0.1  # the share of each round's privacy budget spent on the Dice proxy
    report_dice: bool = True  # evaluation runs ask for labelled Dice; a deployed site sends it only if its node config allows
    state_root: str = ""  # simulation: where sites without a state-dir node config keep their state
    strategy_options: dict[str, Any] = field(default_factory=dict)  # the variant's own settings (federation.options)

    def __post_init__(self) -> None:
        if self.variant not in STRATEGIES:
            raise ValueError(f"variant={self.variant!r}: choose one of {tuple(STRATEGIES)}")
        if self.rounds < 1 or self.min_images < 1 or not 0 < self.metrics_share < 1:
            raise ValueError(f"site config: rounds >= 1, min_images >= 1, 0 < metrics_share < 1 required, got "
                             f"{self.rounds}, {self.min_images}, {self.metrics_share}")

    @property
    def strategy(self) -> Strategy:
        return get_strategy(self.variant)

    @property
    def private(self) -> bool:
        """The variant's every data-dependent value leaves noised, under the site's ledger."""
        return self.strategy.private


def weights_digest(model: ResUNet) -> str:
    """sha256 over the architecture and every weight: the same model has the same digest in any file."""
    h = hashlib.sha256(json.dumps(asdict(model.config), sort_keys=True).encode())
    for key, tensor in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


SOURCE_META = ("shift_reference", "quality", "geometry")  # what a site's adaptation reads besides the weights


def source_digest(model: ResUNet, meta: dict) -> str:
    """sha256 over the weights and the metadata a site acts on (bn=auto's shift unit, the quality model,
    the geometry reference): a site that pins it runs neither other weights nor another quality model
    or crop reference than the one its hospital approved, whoever sends them. A missing geometry
    reads as {} (what the coordinator sends for a checkpoint without one)."""
    canonical = {"shift_reference": meta.get("shift_reference"), "quality": meta.get("quality"),
                 "geometry": meta.get("geometry") or {}}
    h = hashlib.sha256(weights_digest(model).encode())
    h.update(json.dumps(canonical, sort_keys=True).encode())
    return h.hexdigest()


def load_source(path: str | Path) -> tuple[ResUNet, dict, str]:
    """(model, checkpoint metadata, source digest: weights and metadata); one load per file version
    and process, however many rounds and sites it serves."""
    st = Path(path).stat()
    return _load_source(str(path), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=4)
def _load_source(path: str, size: int, mtime: int) -> tuple[ResUNet, dict, str]:
    model, meta = load_checkpoint(path)
    meta = {k: v for k, v in meta.items() if k in SOURCE_META}
    return model, meta, source_digest(model, meta)


def open_site_data(cfg: SiteConfig, domain: str):
    data = DataConfig(**{k: v for k, v in cfg.data.items() if k in DataConfig.__dataclass_fields__})
    return open_domain(data, domain, data.site_split)


def chunk(n: int, rounds: int, rnd: int, min_images: int = 1) -> range:
    """The images of round `rnd` (1-based): n images split evenly over at most `rounds` rounds, so that
    every chunk holds at least min_images (the site's rule, whatever `rounds` the coordinator asks);
    rounds past the last chunk get no images. n < min_images: one chunk, too small to be released."""
    used = max(1, min(rounds, n // max(1, min_images)))
    if rnd > used:
        return range(n, n)
    return range(math.floor((rnd - 1) * n / used), math.floor(rnd * n / used))


__all__ = ["SOURCE_META", "SiteConfig", "chunk", "load_source", "open_site_data", "source_digest", "weights_digest"]
