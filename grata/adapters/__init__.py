"""Test-time adapters: `build_adapter(name, model, **options)`.

    adapter = build_adapter("grata", model, lr=1e-4, aux="ent", pse="consis", bn="image")
    logits = adapter.adapt_and_predict(images)   # float [B,3,H,W] in [0,1] -> [B,2,H,W]
    adapter.last_step                            # diagnostics of the last step
    adapter.reset()                              # back to the source model
"""
from __future__ import annotations

from torch import nn

from grata.adapters.base import Adapter
from grata.adapters.bn import BNAdapter
from grata.adapters.grata import GraTaAdapter
from grata.adapters.sar import SARAdapter
from grata.adapters.source import SourceAdapter
from grata.adapters.tent import TentAdapter

ADAPTERS: dict[str, type[Adapter]] = {
    cls.name: cls for cls in (SourceAdapter, BNAdapter, TentAdapter, GraTaAdapter, SARAdapter)
}


def build_adapter(name: str, model: nn.Module, **options) -> Adapter:
    if name not in ADAPTERS:
        raise ValueError(f"adapter {name!r}: choose one of {sorted(ADAPTERS)}")
    try:
        return ADAPTERS[name](model, **options)
    except TypeError as exc:  # an option this method does not take
        raise ValueError(f"adapter {name!r}: {exc}") from exc


__all__ = ["Adapter", "ADAPTERS", "build_adapter"]
