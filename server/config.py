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
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from grata.config import MethodConfig
from grata.federation.strategies import STRATEGIES, check_options
from grata.privacy import ACCOUNTANTS, AGGREGATIONS
from grata.scenario import ScenarioConfig
from grata.train_source import TrainSourceConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


# One member per registered strategy (grata/federation/strategies/: local_only, fed_stats, fed_affine,
# ...): a new variant's module is all it takes for Hydra's `federation=<name>` to accept it.
Variant = Enum("Variant", {name: name for name in STRATEGIES}, module=__name__, qualname="Variant")


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
    # and order it back to the source model: off by default, because the proxy is anchored to the source model
    # and falls when adaptation rightly departs from it (bench.privacy_curve, local_only: 58.6 -> 46.4 with it on)
    reset_on_drop: bool = False
    fallback_flag: float = 0.5  # flag a site that fell back to the source model on more than this share of a round's images
    round_timeout_s: float = 0.0  # 0: wait for every site
    min_sites: int = 1  # fewer replies than this ends the run as failed
    aggregation: str = "mean"  # across sites: mean (by capped image counts), median or trimmed_mean (one vote per site)
    trim: float = 0.2  # trimmed_mean: the share of sites dropped at each end of every coordinate
    # {site: the round it joins in} (late joiners); other sites join in round 1. Typed Any (checked below)
    # so that `federation.join_round={gamma:3}` on the command line replaces the value: Hydra merges an
    # override into a typed dict, which the composed configuration's struct flag refuses
    join_round: Any = None
    options: Any = None  # {setting: value}: variants' own settings (each strategy's `options` declares its keys); Any as above

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS or not 0 <= self.trim < 0.5:
            raise ValueError(f"federation.aggregation={self.aggregation!r} (choose from {AGGREGATIONS}) "
                             f"and 0 <= federation.trim < 0.5 (got {self.trim})")
        if self.rounds < 1:
            raise ValueError(f"federation.rounds={self.rounds} must be >= 1")
        if not 0 <= self.pooled_weight <= 1:
            raise ValueError(f"federation.pooled_weight={self.pooled_weight} must lie in [0, 1]")
        if not 0 < self.fallback_flag <= 1:
            raise ValueError(f"federation.fallback_flag={self.fallback_flag} must lie in (0, 1]")
        if self.proxy_margin <= 0 or self.round_timeout_s < 0 or self.min_sites < 1:
            raise ValueError("federation: proxy_margin > 0, round_timeout_s >= 0 and min_sites >= 1 are required")
        if self.join_round is not None and not (isinstance(self.join_round, dict)
                                                and all(isinstance(k, str) for k in self.join_round)):
            raise ValueError(f"federation.join_round={self.join_round!r}: expected {{site: round}}, e.g. {{gamma: 3}}")
        late = {site: r for site, r in (self.join_round or {}).items() if not (isinstance(r, int) and 1 <= r <= self.rounds)}
        if late:
            raise ValueError(f"federation.join_round: {late}: a site joins in a round from 1 to federation.rounds={self.rounds}")
        if self.options is not None and not isinstance(self.options, dict):
            raise ValueError(f"federation.options={self.options!r}: expected {{setting: value}}")
        check_options(self.options or {})  # a key no variant declares: an error naming it

    def joins(self, site: str) -> int:
        """The round `site` joins in (1 unless federation.join_round says later)."""
        return int((self.join_round or {}).get(site, 1))


@dataclass
class PrivacyConfig:
    epsilon: float = 8.0  # the whole run's budget per site
    delta: float = 1e-5
    clip: float = 2.0  # per-image L2 bound of its source-relative BN moments (grata/privacy.py)
    accountant: str = "rdp"
    min_images: int = 2  # fewest images per release asked of every site (a site's node config may raise it)
    metrics_share: float = 0.1  # share of each round's budget spent on the noised Dice proxy (the rest: BN statistics)
    report_dice: bool = True  # ask labelled sites for Dice (evaluation only; a deployed site needs report-dice in its node config)

    def __post_init__(self) -> None:
        if self.epsilon <= 0 or not 0 < self.delta < 1 or self.clip <= 0:
            raise ValueError(f"privacy: epsilon > 0, 0 < delta < 1 and clip > 0 are required, got {self}")
        if self.min_images < 1 or not 0 < self.metrics_share < 1:
            raise ValueError(f"privacy: min_images >= 1 and 0 < metrics_share < 1 are required, got {self}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"privacy.accountant={self.accountant!r}: choose one of {ACCOUNTANTS}")


@dataclass
class MlflowConfig:
    tracking_uri: str = ""  # "" = sqlite:///<launch directory>/mlflow.db (absolute)
    experiment: str = "fedgrata"
    run_name: str = ""  # "" = "<variant> <group>"
    group: str = ""  # the comparison a run belongs to (tag fedgrata.compare); "" = the run folder's name
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
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)  # conf/scenario: sets data.sites per data kind

    def __post_init__(self) -> None:
        if self.scenario.name:  # before the checks below: the scenario's hospitals replace data.sites
            chosen = self.scenario.for_kind(self.data.kind)
            self.data.sites = list(chosen.sites)
            self.data.site_split = chosen.site_split or self.data.site_split
            self.data.synthetic_test = chosen.images or self.data.synthetic_test
            self.federation.rounds = chosen.rounds or self.federation.rounds
            self.federation.join_round = {**chosen.join_round, **(self.federation.join_round or {})}
            late = {s: r for s, r in self.federation.join_round.items() if r > self.federation.rounds}
            if late:
                raise ValueError(f"scenario={self.scenario.name}: {late} join after the last round {self.federation.rounds}")
        if self.engine not in ("flower", "inline"):
            raise ValueError(f"engine={self.engine!r}: choose flower or inline")
        if len(self.data.sites) < 1:
            raise ValueError("data.sites is empty: configure at least one site")
        unknown = sorted(set(self.federation.join_round or {}) - set(self.data.sites))
        if unknown:
            raise ValueError(f"federation.join_round names {unknown}, not sites of data.sites={list(self.data.sites)}")
        if all(self.federation.joins(s) > 1 for s in self.data.sites):
            raise ValueError("federation.join_round: every site joins late; at least one must start in round 1")
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


# `flwr run . --run-config "federation='fed_stats' rounds=2"`: flat keys (pyproject's [tool.flwr.app.config])
# and the configuration setting each one sets. "" or 0 keeps the configuration's own value.
RUN_CONFIG_KEYS = {"federation": "federation", "method": "method", "data": "data", "model": "model",
                   "rounds": "federation.rounds", "epsilon": "privacy.epsilon", "sites": "data.sites",
                   "checkpoint": "checkpoint", "mlflow-uri": "mlflow.tracking_uri", "resume": "resume"}
RUN_CONFIG_OTHER = ("overrides", "base-dir")  # Hydra overrides as one string (power users); where paths start


def run_config_overrides(run_config: dict) -> list[str]:
    """Flower's run config -> Hydra overrides. The flat keys come first; `overrides` (one shell-quoted
    string of Hydra overrides) comes last and wins where both name the same setting."""
    unknown = sorted(set(run_config) - set(RUN_CONFIG_KEYS) - set(RUN_CONFIG_OTHER))
    if unknown:
        raise ValueError(f"run config: unknown key(s) {unknown}; the keys are "
                         f"{sorted([*RUN_CONFIG_KEYS, *RUN_CONFIG_OTHER])} (pyproject.toml [tool.flwr.app.config])")
    power = shlex.split(str(run_config.get("overrides", "")))
    named = {o.lstrip("+~").split("=", 1)[0] for o in power}
    flat = []
    for key, setting in RUN_CONFIG_KEYS.items():
        value = run_config.get(key, "")
        if value in ("", 0, 0.0) or setting in named:
            continue
        if key == "sites" and not str(value).startswith("["):
            value = "[" + ",".join(v.strip() for v in str(value).split(",") if v.strip()) + "]"
        flat.append(f"{setting}={value}")
    return [*flat, *power]


def resolved(cfg: FederateConfig) -> dict:
    """The whole configuration as plain data (enums as their names), for run records."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)


__all__ = ["RUN_CONFIG_KEYS", "run_config_overrides", "AffineWeighting", "FederateConfig", "FederationConfig", "MlflowConfig", "PrivacyConfig", "Variant",
           "load_config", "resolved"]
