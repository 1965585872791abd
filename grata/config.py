"""Typed configuration shared by the entry points (registered with Hydra's ConfigStore there)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from grata.data import ImageFolder, fundus_split
from grata.scenario import hospital, open_hospital
from grata.synthetic import SyntheticDomain, style_of
from grata.widefield import WideField


@dataclass
class DataConfig:
    kind: str = "synthetic"  # synthetic | fundus | folder
    root: str = "../shared/data/fundus"  # fundus: the CSV folder; folder: the image folder
    size: int = 256
    source: str = "clean"
    targets: list[str] = field(default_factory=lambda: ["colour_cast", "gamma", "low_contrast", "uneven_light"])
    target_split: str = "all"  # fundus: train, test or all
    sites: list[str] = field(default_factory=lambda: ["colour_cast", "gamma", "low_contrast", "uneven_light"])
    site_split: str = "test"  # the federation's sites adapt over this split of their domain
    synthetic_train: int = 160
    synthetic_test: int = 48
    on_error: str = "raise"  # raise | skip
    seed: int = 0
    field_scale: float = 1.0  # < 1: every target image shown this much smaller in a wider circular field (grata/widefield.py)

    def __post_init__(self) -> None:
        if self.kind not in ("synthetic", "fundus", "folder"):
            raise ValueError(f"data.kind={self.kind!r}: choose synthetic, fundus or folder")
        if self.size < 32 or self.size % 32:
            raise ValueError(f"data.size={self.size}: must be a positive multiple of 32")
        for key in ("target_split", "site_split"):
            if getattr(self, key) not in ("train", "test", "all"):
                raise ValueError(f"data.{key}={getattr(self, key)!r}: choose train, test or all")
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"data.on_error={self.on_error!r}: choose raise or skip")
        if not 0 < self.field_scale <= 1:
            raise ValueError(f"data.field_scale={self.field_scale}: must lie in (0, 1] (1 = images as they are)")


@dataclass
class MethodConfig:
    """A named test-time method: an adapter (grata/adapters) and its options."""
    adapter: str = "source"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    threads: int = 0  # 0 = torch's default
    precision: str = "fp32"  # fp32 | bf16 (autocast + channels-last; bench/train.py measures both) | auto (bf16 where native)
    quality_images: int = 80  # source images (each + 3 simulated shifts) the quality estimate is fitted on

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16", "auto"):
            raise ValueError(f"train.precision={self.precision!r}: choose fp32, bf16 or auto")


def resolve_root(root: str, base: str | Path | None = None) -> Path:
    """Relative data roots are taken from the directory the user launched from, not Hydra's run dir."""
    p = Path(root).expanduser()
    return p if p.is_absolute() or base is None else Path(base) / p


def open_domain(cfg: DataConfig, domain: str, split: str, base: str | Path | None = None) -> torch.utils.data.Dataset:
    """The dataset of one domain and split (train, test or all) for the configured data kind, shown in
    a wider field when data.field_scale < 1 (never the source: see `open_source`)."""
    ds = _open_domain(cfg, domain, split, base)
    return ds if cfg.field_scale == 1 or domain == cfg.source else WideField(ds, cfg.field_scale)


def _open_domain(cfg: DataConfig, domain: str, split: str, base: str | Path | None = None) -> torch.utils.data.Dataset:
    if cfg.kind == "synthetic":
        style_of(domain)  # the error names the domain and the styles
        if split == "all":
            parts = [_open_domain(cfg, domain, s) for s in ("train", "test")]
            return torch.utils.data.ConcatDataset(parts)
        n = cfg.synthetic_train if split == "train" else cfg.synthetic_test
        return SyntheticDomain(domain, n=n, size=cfg.size, split=split, seed=cfg.seed)
    root = resolve_root(cfg.root, base)
    if hospital(domain)[1] is not None and not _exists(cfg, root, domain, split):
        # `<domain>-<letter>`: one of several hospitals cut from that domain (grata/scenario.py)
        return open_hospital(domain, cfg.sites, lambda d: _open_domain(cfg, d, split, base), split, cfg.seed)
    if cfg.kind == "fundus":
        return fundus_split(root, domain, split, cfg.size)
    folder = root / domain if (root / domain).is_dir() else root
    return ImageFolder(folder, cfg.size)


def _exists(cfg: DataConfig, root: Path, domain: str, split: str) -> bool:
    """Whether `domain` names data of its own (a CSV or a folder), not a hospital cut from another."""
    if cfg.kind == "fundus":
        return (root / f"{domain}_{'train' if split == 'all' else split}.csv").is_file()
    return (root / domain).is_dir()


__all__ = ["DataConfig", "MethodConfig", "TrainConfig", "open_domain", "resolve_root"]
