"""Test-batch BN statistics, no parameter update (per-image statistics by default)."""
from __future__ import annotations

from grata.adapters.source import SourceAdapter


class BNAdapter(SourceAdapter):
    name = "bn"
    default_bn = "image"
