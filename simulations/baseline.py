"""The unadapted source model on the federation's sites: the row every variant is compared against.

Runs where the sites' data is readable from this process (simulation); scores each labelled site's
whole stream with `grata.adapters.source` (eval-mode BN, no update), image-weighted like the sites'
own Dice. Returns {} when no site holds labels.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from grata.federation.siteconfig import load_source
from grata.adapters import build_adapter
from grata.config import open_domain
from grata.data import StreamReport, stream
from grata.metrics import score
from grata.progress import Progress
from server.config import FederateConfig


def source_scores(cfg: FederateConfig, checkpoint: Path, base: Path) -> dict[str, dict[str, Any]]:
    """Per site: dice_mean, dice_disc, dice_cup (x100, over every readable image), images, skipped."""
    torch.set_num_threads(max(1, cfg.threads))  # like one site: torch's default of every core crawls beside other work
    model, meta, _ = load_source(checkpoint)
    adapter = build_adapter("source", model, shift_reference=meta.get("shift_reference"))
    out: dict[str, dict[str, Any]] = {}
    datasets = {site: open_domain(cfg.data, site, cfg.data.site_split, base) for site in cfg.data.sites}
    with Progress(sum(len(d) for d in datasets.values()), "source model on every site") as bar:
        for site, ds in datasets.items():
            report, rows = StreamReport(), []
            for sample in stream(ds, cfg.data.on_error, report):
                bar.update()
                if sample.mask is None:  # an unlabelled site: no Dice to compare with
                    break
                logits = adapter.adapt_and_predict(sample.image[None])  # "source" adapts nothing
                rows.append({k: float(v[0]) for k, v in score(logits.float().cpu(), sample.mask[None], with_asd=False).items()})
            if rows:
                out[site] = {k: float(np.mean([r[k] for r in rows])) for k in ("dice_mean", "dice_disc", "dice_cup")}
                out[site].update(images=len(rows), skipped=len(report.skipped))
    return out


__all__ = ["source_scores"]
