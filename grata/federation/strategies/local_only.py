"""local_only: every site adapts on its own; it shares the Dice proxy and the alignment summary
(exact values, no epsilon claimed) and gets nothing back but the coordinator's reset orders."""
from __future__ import annotations

from grata.federation.strategies.base import Strategy


class LocalOnly(Strategy):
    name = "local_only"  # the base class's defaults are exactly this variant


__all__ = ["LocalOnly"]
