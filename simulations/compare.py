"""local_only, fed_stats and fed_affine on the same sites and seed: `python -m simulations.compare [overrides]`.

Each variant is one Flower simulation and one parent run in MLflow. Prints and writes a comparison
table (rows: variant; columns: each site and the mean; Dice where sites are labelled, else the proxy),
compare.csv, compare.json and compare.png under <out_dir>/compare-<time>/.
"""
from __future__ import annotations

import copy
import csv
import json
import time
from pathlib import Path

import hydra
import numpy as np
from hydra.utils import get_original_cwd
from omegaconf import OmegaConf

from server.config import FederateConfig, Variant
from server.report import mean_row
from simulations.plots import dice_bars
from simulations.run import quiet, simulate


def comparison(results: dict[str, dict], sites: list[str]) -> str:
    key = "dice_mean" if all("dice_mean" in r["sites"].get(s, {}) for r in results.values() for s in sites) else "dice_proxy"
    cols = [*sites, "mean"]
    head = f"{'variant':<12}" + "".join(f"{c:>16}" for c in cols) + f"{'eps':>7}{'flags':>6}{'wall s':>8}"
    lines = [f"{key} per site (image-weighted over the whole stream)", head, "-" * len(head)]
    for name, res in results.items():
        rows = {**res["sites"], "mean": mean_row(res["sites"])}
        cells = "".join(f"{rows[c].get(key, float('nan')):>16.2f}" if c in rows else f"{'failed':>16}" for c in cols)
        eps = rows["mean"].get("dp_epsilon")
        flags = sum(r.get("flagged", 0) for r in res["sites"].values())
        lines.append(f"{name:<12}{cells}{(f'{eps:.2f}' if eps is not None else '-'):>7}{flags:>6}{res['timing']['wall_s']:>8.0f}")
    return "\n".join(lines)


def proxy_correlation(results: dict[str, dict]) -> float | None:
    """Pearson correlation of the Dice proxy with the true Dice over every labelled site-round."""
    pairs = []
    for res in results.values():
        with (Path(res["run_dir"]) / "rounds.csv").open() as fh:
            pairs += [(float(r["dice_proxy"]), float(r["dice_mean"])) for r in csv.DictReader(fh)
                      if r.get("dice_proxy") and r.get("dice_mean")]
    if len(pairs) < 3:
        return None
    proxy, dice = np.array(pairs).T
    if proxy.std() == 0 or dice.std() == 0:
        return None
    return float(np.corrcoef(proxy, dice)[0, 1])


def compare(cfg: FederateConfig, base: Path) -> dict[str, dict]:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(cfg.out_dir)
    out = (out if out.is_absolute() else base / out) / f"compare-{stamp}"
    results = {}
    for i, name in enumerate(cfg.variants):
        print(f"\n=== variant {i + 1}/{len(cfg.variants)}: {name} ===", flush=True)
        run_cfg = copy.deepcopy(cfg)
        run_cfg.federation.variant = Variant[name]
        results[name] = simulate(run_cfg, base, out / name)
    sites = list(cfg.data.sites)
    table = comparison(results, sites)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(results, indent=2, default=str))
    with (out / "compare.csv").open("w", newline="") as fh:
        keys = ("dice_mean", "dice_disc", "dice_cup", "dice_proxy", "dp_epsilon")
        w = csv.writer(fh)
        w.writerow(["variant", "site", *keys])
        for name, res in results.items():
            for site, row in {**res["sites"], "mean": mean_row(res["sites"])}.items():
                w.writerow([name, site, *[f"{row[k]:.3f}" if k in row else "" for k in keys]])
    bars = {name: {**{s: r["sites"].get(s, {}) for s in sites}, "mean": mean_row(r["sites"])} for name, r in results.items()}
    if all("dice_mean" in b[s] for b in bars.values() for s in [*sites, "mean"]):
        dice_bars(bars, sites, out / "compare.png", title=f"{cfg.data.kind}: {cfg.method.adapter} per site, by federation variant")
    corr = proxy_correlation(results)
    if corr is not None:
        table += f"\nDice proxy vs true Dice over all site-rounds: Pearson r = {corr:.2f}"
    (out / "compare.txt").write_text(table + "\n")
    print("\n" + table)
    print(f"written to {out}; MLflow: {next(iter(results.values()))['mlflow']['uri']}")
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="federate")
def main(cfg) -> None:
    quiet()
    compare(OmegaConf.to_object(cfg), Path(get_original_cwd()))


if __name__ == "__main__":
    main()
