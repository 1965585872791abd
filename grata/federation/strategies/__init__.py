"""The federation variants, one module each over strategies/base.py, and the one registry.

A new variant: a module here with a Strategy subclass, one line in STRATEGIES below, and
conf/federation/<name>.yaml (`variant: <name>`, its settings under `options:`). docs/federation.md,
"Writing a variant", has an example.
"""
from __future__ import annotations

from grata.federation.strategies.base import Arrays, RoundLog, Strategy
from grata.federation.strategies.fed_affine import FedAffine
from grata.federation.strategies.fed_kin import FedKin
from grata.federation.strategies.fed_stats import FedStats
from grata.federation.strategies.local_only import LocalOnly

STRATEGIES: dict[str, Strategy] = {s.name: s for s in (LocalOnly(), FedStats(), FedAffine(), FedKin())}


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown federation variant {name!r}; choose one of {tuple(STRATEGIES)}")
    return STRATEGIES[name]


def check_options(options: dict) -> None:
    """federation.options: every key must be a setting of some variant (a typo is an error, not ignored)."""
    known = {key for s in STRATEGIES.values() for key in s.options}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"federation.options: {unknown} are settings of no variant (known: {sorted(known) or 'none'})")


__all__ = ["Arrays", "RoundLog", "STRATEGIES", "Strategy", "check_options", "get_strategy"]
