"""The federation's typed configuration (Hydra ConfigStore schemas) and the compose entry.

Groups (conf/): data, model, method, federation, privacy, mlflow. A bad value (a wrong type, an
unknown variant, a value out of range) stops the run with Hydra's or this module's error before any
work starts.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from grata.config import MethodConfig
from grata.privacy import ACCOUNTANTS
from grata.train_source import TrainSourceConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class Variant(Enum):
    local_only = "local_only"  # sites share proxies and summaries only
    fed_stats = "fed_stats"  # + differentially private BN statistics, pooled and broadcast
    fed_affine = "fed_affine"  # + adapted BN affine parameters, averaged and broadcast


class AffineWeighting(Enum):
    images = "images"  # by image count
    alignment = "alignment"  # by image count x (1 + mean gradient cosine)^2 / 4


@dataclass
class FederationConfig:
    variant: Variant = Variant.local_only
    rounds: int = 4  # each site's stream is split evenly over the rounds
    pooled_weight: float = 0.5  # fed_stats: the pooled statistics' share of a BN layer's mix, times the signal share the privacy noise left in that layer
    affine_weighting: AffineWeighting = AffineWeighting.images
    proxy_margin: float = 10.0  # flag a site whose Dice proxy falls this far below its best
    reset_on_drop: bool = True  # and order it back to the source model
    fallback_flag: float = 0.5  # flag a site that fell back to the source model on more than this share of a round's images
    round_timeout_s: float = 0.0  # 0: wait for every site
    min_sites: int = 1  # fewer replies than this ends the run as failed

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"federation.rounds={self.rounds} must be >= 1")
        if not 0 <= self.pooled_weight <= 1:
            raise ValueError(f"federation.pooled_weight={self.pooled_weight} must lie in [0, 1]")
        if not 0 < self.fallback_flag <= 1:
            raise ValueError(f"federation.fallback_flag={self.fallback_flag} must lie in (0, 1]")
        if self.proxy_margin <= 0 or self.round_timeout_s < 0 or self.min_sites < 1:
            raise ValueError("federation: proxy_margin > 0, round_timeout_s >= 0 and min_sites >= 1 are required")


@dataclass
class PrivacyConfig:
    epsilon: float = 8.0  # the whole run's budget per site
    delta: float = 1e-5
    clip: float = 2.0  # per-image L2 bound of its source-relative BN moments (grata/privacy.py)
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        if self.epsilon <= 0 or not 0 < self.delta < 1 or self.clip <= 0:
            raise ValueError(f"privacy: epsilon > 0, 0 < delta < 1 and clip > 0 are required, got {self}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"privacy.accountant={self.accountant!r}: choose one of {ACCOUNTANTS}")


@dataclass
class MlflowConfig:
    tracking_uri: str = ""  # "" = sqlite:///<launch directory>/mlflow.db (absolute)
    experiment: str = "fedgrata"
    run_name: str = ""  # "" = the variant
    overlays: int = 2  # per site; drawn and kept at the site, logged only where the site folder is local


@dataclass
class FederateConfig(TrainSourceConfig):  # data, model, train, checkpoint: the source model, trained on first use
    method: MethodConfig = field(default_factory=MethodConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    seed: int = 0
    threads: int = 1  # torch threads per site
    engine: str = "flower"  # flower: Flower's simulation engine; inline: one process, sites in turn
    variants: list[str] = field(default_factory=lambda: [v.value for v in Variant])  # simulations.compare
    out_dir: str = "runs/federate"
    resume: str = ""  # simulations.run: the folder of an interrupted run to continue, same configuration

    def __post_init__(self) -> None:
        if self.engine not in ("flower", "inline"):
            raise ValueError(f"engine={self.engine!r}: choose flower or inline")
        if len(self.data.sites) < 1:
            raise ValueError("data.sites is empty: configure at least one site")
        bad = [v for v in self.variants if v not in Variant.__members__]
        if bad:
            raise ValueError(f"variants: unknown {bad}; choose from {list(Variant.__members__)}")


ConfigStore.instance().store(name="federate_schema", node=FederateConfig)


def load_config(overrides: list[str] | str = (), config_name: str = "federate") -> FederateConfig:
    """Compose conf/<config_name>.yaml with Hydra overrides (a list, or one shell-quoted string)."""
    if isinstance(overrides, str):
        overrides = shlex.split(overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides))
    return OmegaConf.to_object(cfg)


def resolved(cfg: FederateConfig) -> dict:
    """The whole configuration as plain data (enums as their names), for run records."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)


__all__ = ["AffineWeighting", "FederateConfig", "FederationConfig", "MlflowConfig", "PrivacyConfig", "Variant",
           "load_config", "resolved"]
