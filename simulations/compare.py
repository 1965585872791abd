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
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from grata.train_source import ensure_source
from server.config import FederateConfig, Variant, resolved
from server.report import mean_row
from server.tracking import log_source_run
from simulations.baseline import source_scores
from simulations.plots import dice_bars
from simulations.run import quiet, simulate


def _cell(row: dict | None, key: str) -> str:
    """"79.37 (86.7/72.0)": mean Dice (disc/cup), or the proxy alone where there are no labels."""
    if row is None:
        return "failed"
    if key == "dice_mean" and "dice_disc" in row:
        return f"{row['dice_mean']:.2f} ({row['dice_disc']:.1f}/{row['dice_cup']:.1f})"
    return f"{row.get(key, float('nan')):.2f}"


def comparison(results: dict[str, dict], sites: list[str], source: dict[str, dict] | None = None) -> str:
    """The console's comparison: a row per variant (and the unadapted `source` first, where sites are
    labelled), a column per site and the mean."""
    key = "dice_mean" if all("dice_mean" in r["sites"].get(s, {}) for r in results.values() for s in sites) else "dice_proxy"
    cols = [*sites, "mean"]
    width = max(18 if key == "dice_mean" else 10, *(len(c) + 2 for c in cols))
    head = f"{'variant':<12}" + "".join(f"{c:>{width}}" for c in cols) + f"{'eps':>7}{'flags':>6}{'wall s':>8}"
    what = "Dice x100, mean (disc/cup)" if key == "dice_mean" else "Dice proxy x100 (no labels at the sites)"
    lines = [f"{what} per site over its whole stream; mean: image-weighted over every site's images", head, "-" * len(head)]
    if source and key == "dice_mean":
        rows = {**source, "mean": weighted_row(source)}
        lines.append(f"{'source':<12}" + "".join(f"{_cell(rows.get(c), key):>{width}}" for c in cols)
                     + f"{'-':>7}{'-':>6}{'-':>8}")
    for name, res in results.items():
        rows = {**res["sites"], "mean": weighted_row(res["sites"])}
        cells = "".join(f"{_cell(rows.get(c), key):>{width}}" for c in cols)
        eps = rows["mean"].get("dp_epsilon")
        flags = sum(r.get("flagged", 0) for r in res["sites"].values())
        lines.append(f"{name:<12}{cells}{(f'{eps:.2f}' if eps is not None else '-'):>7}{flags:>6}{res['timing']['wall_s']:>8.0f}")
    return "\n".join(lines)


def weighted_mean(by_site: dict[str, dict], key: str = "dice_mean") -> float | None:
    """Image-weighted mean of a per-site figure: every image of every site counts once."""
    pairs = [(row[key], row.get("images", 0)) for row in by_site.values() if key in row]
    total = sum(n for _, n in pairs)
    return sum(v * n for v, n in pairs) / total if total else None


WEIGHTED = ("dice_mean", "dice_disc", "dice_cup", "dice_proxy")


def weighted_row(by_site: dict[str, dict]) -> dict[str, float]:
    """The comparison's `mean` column: Dice (and the proxy) image-weighted over all sites' images, the
    other figures as server.report.mean_row has them (a plain mean over sites)."""
    row = mean_row(by_site)
    for key in WEIGHTED:
        value = weighted_mean(by_site, key)
        if value is not None:
            row[key] = value
    return row


def summary(results: dict[str, dict]) -> dict:
    """summary.json: per variant the image-weighted mean Dice over the whole stream and each site's
    stream-level Dice, {"variants": {name: {"dice_mean": m, "sites": {site: d}}}} (compare.json holds
    the image counts that recompute dice_mean)."""
    out = {}
    for name, res in results.items():
        sites = {s: row["dice_mean"] for s, row in res["sites"].items() if "dice_mean" in row}
        if sites:
            out[name] = {"dice_mean": weighted_mean(res["sites"]), "sites": sites}
    return {"variants": out}


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


def method_name(cfg: FederateConfig) -> str:
    """The method's name as the user chose it (conf/method/<name>.yaml), else its adapter."""
    try:
        from hydra.core.hydra_config import HydraConfig
        return str(HydraConfig.get().runtime.choices.get("method") or cfg.method.adapter)
    except ValueError:  # not under @hydra.main
        return cfg.method.adapter


def baseline(cfg: FederateConfig, base: Path, group: str) -> dict[str, dict]:
    """The unadapted source model on the sites (labelled ones), recorded as the group's `source` run."""
    source = source_scores(cfg, ensure_source(cfg, base), base)
    if source:
        datasets = {site: {"kind": cfg.data.kind, "source": f"{cfg.data.kind}:{site}", "images": row["images"],
                           "labelled": True, "split": cfg.data.site_split, "size": cfg.data.size}
                    for site, row in source.items()}
        log_source_run(cfg.mlflow, base, group, source, weighted_row(source), resolved(cfg), datasets)
    return source


def write_comparison(cfg: FederateConfig, out: Path, results: dict[str, dict], source: dict[str, dict]) -> str:
    """The comparison table (printed and compare.txt), compare.csv, compare.json and compare.png in `out`."""
    sites = list(cfg.data.sites)
    table = comparison(results, sites, source)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary(results), indent=2))
    (out / "compare.json").write_text(json.dumps({**results, **({"source": {"sites": source}} if source else {})},
                                                 indent=2, default=str))
    rows_of = {**({"source": source} if source else {}), **{n: r["sites"] for n, r in results.items()}}
    with (out / "compare.csv").open("w", newline="") as fh:
        keys = ("dice_mean", "dice_disc", "dice_cup", "dice_proxy", "dp_epsilon")
        w = csv.writer(fh)
        w.writerow(["variant", "site", *keys])
        for name, by_site in rows_of.items():
            for site, row in {**by_site, "mean": weighted_row(by_site)}.items():
                w.writerow([name, site, *[f"{row[k]:.3f}" if k in row else "" for k in keys]])
    bars = {name: {**{s: by_site.get(s, {}) for s in sites}, "mean": weighted_row(by_site)} for name, by_site in rows_of.items()}
    if all("dice_mean" in b[s] for b in bars.values() for s in [*sites, "mean"]):
        dice_bars(bars, sites, out / "compare.png",
                  title=f"{cfg.data.kind} sites, {cfg.model.encoder} at {cfg.data.size} px: "
                        f"method {method_name(cfg)} per site, by federation variant")
    corr = proxy_correlation(results)
    if corr is not None:
        table += f"\nDice proxy vs true Dice over all site-rounds: Pearson r = {corr:.2f}"
    (out / "compare.txt").write_text(table + "\n")
    print("\n" + table)
    print(f"written to {out}; MLflow: {next(iter(results.values()))['mlflow']['uri']}")
    return table


def compare(cfg: FederateConfig, base: Path) -> dict[str, dict]:
    """One sweep over cfg.variants on the same sites and seed, after the source baseline."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(cfg.out_dir)
    out = (out if out.is_absolute() else base / out) / f"compare-{stamp}"
    group = out.name  # tag fedgrata.compare and part of every MLflow run name of this comparison
    print(f"comparison folder: {out}", flush=True)
    source = baseline(cfg, base, group)
    results, start = {}, time.perf_counter()
    for i, name in enumerate(cfg.variants):
        # the comparison's overall ETA: the variants so far took about this long each
        left = f" (about {(time.perf_counter() - start) / i * (len(cfg.variants) - i):.0f} s left)" if i else ""
        print(f"\n=== variant {i + 1}/{len(cfg.variants)}: {name} ==={left}", flush=True)
        run_cfg = copy.deepcopy(cfg)
        run_cfg.federation.variant = Variant[name]
        run_cfg.mlflow.group = group
        results[name] = simulate(run_cfg, base, out / name)
    write_comparison(cfg, out, results, source)
    return results


class CompareCallback(Callback):
    """Hydra's multirun as the comparison: `python -m simulations.run -m federation=local_only,fed_stats,fed_affine`.

    Each job is one variant, all in one MLflow group (the sweep folder's name, see simulations.run);
    when the sweep ends, the same source run, table and files as simulations.compare, in the sweep folder."""

    def __init__(self) -> None:
        self.results: dict[str, dict] = {}

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs) -> None:
        if job_return.status == JobStatus.COMPLETED and isinstance(job_return.return_value, dict):
            result = job_return.return_value
            self.results[str(result.get("variant"))] = result

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if not self.results:
            return
        plain = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
        cfg: FederateConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(FederateConfig), plain))
        base, out = Path(config.hydra.runtime.cwd), Path(config.hydra.sweep.dir)
        out = out if out.is_absolute() else base / out
        write_comparison(cfg, out, self.results, baseline(cfg, base, out.name))


@hydra.main(version_base="1.3", config_path="../conf", config_name="federate")
def main(cfg) -> None:
    quiet()
    compare(OmegaConf.to_object(cfg), Path(get_original_cwd()))


if __name__ == "__main__":
    main()
