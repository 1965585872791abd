"""The paper's protocol, locally: `python -m simulations.evaluate [overrides]`.

Each method adapts online over every target domain (continual within a target, reset between
targets) and is scored per image against the masks. Prints a table (rows: method; columns: each
target and the mean; disc/cup/mean Dice) and writes table.csv, results.json and per_image.csv.
"""
from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from hydra.utils import get_original_cwd
from omegaconf import OmegaConf
from scipy.stats import spearmanr

from grata.adapters import build_adapter
from grata.config import DataConfig, MethodConfig, open_domain
from grata.data import StreamReport, stream
from grata.metrics import score
from grata.models import load_checkpoint
from grata.progress import Progress
from grata.train_source import TrainSourceConfig, ensure_source
from simulations.plots import dice_bars


@dataclass
class EvaluateConfig(TrainSourceConfig):  # data, model, train, checkpoint: the source model, trained on first use
    methods: dict[str, MethodConfig] = field(default_factory=dict)
    run: list[str] = field(default_factory=list)
    limit: int = 0  # images per target, 0 = all
    seed: int = 0
    out_dir: str = "runs/evaluate"


def nanmean(values: list[float]) -> float:
    """Mean over defined values; surface distance is undefined (NaN) where a mask is empty."""
    arr = np.asarray(values, dtype=float)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else float("nan")


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation; NaN where either side is constant or there are fewer than 3 images."""
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b)[0])


def evaluate_method(name: str, method: MethodConfig, model: torch.nn.Module, data: DataConfig,
                    base: Path | None, limit: int = 0, seed: int = 0, shift_reference: float | None = None,
                    quality: dict | None = None, geometry_reference: dict | None = None) -> tuple[dict, list[dict]]:
    """Run one method over every target; returns per-target means and per-image records (with the
    label-free `quality` estimate of every prediction when the checkpoint has a quality model)."""
    adapter = build_adapter(method.adapter, model, seed=seed, shift_reference=shift_reference, quality=quality,
                            geometry_reference=geometry_reference, **method.options)
    summary, records = {}, []
    for target in data.targets:
        adapter.reset()
        ds = open_domain(data, target, data.target_split, base)
        n = min(len(ds), limit) if limit else len(ds)
        report, bar, t0 = StreamReport(), Progress(n, f"{name:>12} | {target:<14}"), time.perf_counter()
        rows = []
        for sample in stream(ds, data.on_error, report, indices=range(n)):
            if sample.mask is None:
                raise ValueError(f"target {target!r} has no masks; evaluation needs labels (sample {sample.name})")
            logits = adapter.adapt_and_predict(sample.image[None])
            s = {k: float(v[0]) for k, v in score(logits, sample.mask[None]).items()}
            rows.append({"method": name, "target": target, "image": sample.name, **s, **adapter.last_step})
            bar.update(dice=float(np.mean([r["dice_mean"] for r in rows])))
        bar.close()  # skipped files never reach the total
        seconds = time.perf_counter() - t0
        keys = ("dice_disc", "dice_cup", "dice_mean", "asd_disc", "asd_cup")
        summary[target] = {k: nanmean([r[k] for r in rows]) for k in keys}
        summary[target].update(images=len(rows), skipped=len(report.skipped), seconds_per_image=seconds / max(1, len(rows)))
        if "bn_image" in adapter.last_step:
            summary[target]["auto_image_share"] = float(np.mean([r["bn_image"] for r in rows]))
        if "quality" in adapter.last_step:  # the label-free estimate, its rank correlation with Dice, fallbacks
            q = [r["quality"] for r in rows]
            summary[target].update(quality=float(np.mean(q)), fallback_share=float(np.mean([r["fallback"] for r in rows])),
                                   quality_spearman=spearman(q, [r["dice_mean"] for r in rows]))
        if "cosine" in adapter.last_step:
            summary[target]["cosine_mean"] = float(np.mean([r["cosine"] for r in rows]))
            summary[target]["lr_mean"] = float(np.mean([r["lr"] for r in rows]))
        records += rows
    summary["mean"] = {k: float(np.mean([summary[t][k] for t in data.targets])) for k in ("dice_disc", "dice_cup", "dice_mean")}
    summary["describe"] = adapter.describe()
    return summary, records


def format_table(results: dict[str, dict], targets: list[str]) -> str:
    cols = [*targets, "mean"]
    head = f"{'method':<16}" + "".join(f"{c:>22}" for c in cols)
    lines = [head, f"{'':<16}" + "".join(f"{'mean (disc/cup)':>22}" for _ in cols), "-" * len(head)]
    for name, res in results.items():
        cells = "".join(f"{res[c]['dice_mean']:>9.2f} ({res[c]['dice_disc']:5.1f}/{res[c]['dice_cup']:5.1f})" for c in cols)
        lines.append(f"{name:<16}{cells}")
    return "\n".join(lines)


def write_outputs(out: Path, results: dict, records: list[dict], targets: list[str], config: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"config": config, "results": results}, indent=2))
    with (out / "table.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", *[f"{c}_{k}" for c in [*targets, "mean"] for k in ("disc", "cup", "mean")]])
        for name, res in results.items():
            w.writerow([name, *[f"{res[c][f'dice_{k}']:.2f}" for c in [*targets, "mean"] for k in ("disc", "cup", "mean")]])
    keys = sorted({k for r in records for k in r}, key=lambda k: (k not in ("method", "target", "image"), k))
    with (out / "per_image.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(records)
    (out / "table.txt").write_text(format_table(results, targets) + "\n")
    dice_bars(results, targets, out / "dice.png", title=f"{config['data']['kind']}: source {config['data']['source']}")


def run(cfg: EvaluateConfig, base: Path | None = None) -> dict:
    unknown = [m for m in cfg.run if m not in cfg.methods]
    if unknown or not cfg.run:
        raise ValueError(f"run={cfg.run}: unknown methods {unknown}; defined: {sorted(cfg.methods)}")
    torch.manual_seed(cfg.seed)
    model, meta = load_checkpoint(ensure_source(cfg, base), expect=cfg.model)
    # ensure_source completed the checkpoint: its shift reference, quality model and disc geometry
    ref, quality, geo = meta.get("shift_reference"), meta.get("quality"), meta.get("geometry")
    for name in cfg.run:  # fail on a bad option before any long work
        build_adapter(cfg.methods[name].adapter, model, shift_reference=ref, quality=quality, geometry_reference=geo,
                      **cfg.methods[name].options)
    results, records = {}, []
    for name in cfg.run:
        results[name], rows = evaluate_method(name, cfg.methods[name], model, cfg.data, base, cfg.limit, cfg.seed, ref,
                                              quality, geo)
        records += rows
    out = Path(cfg.out_dir)
    out = out if out.is_absolute() or base is None else base / out
    write_outputs(out, results, records, cfg.data.targets, asdict(cfg))
    print(format_table(results, cfg.data.targets))
    print(f"written to {out}")
    return results


ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg) -> None:
    run(OmegaConf.to_object(cfg), base=Path(get_original_cwd()))


if __name__ == "__main__":
    main()
