"""A federation's results for people: per-site table, CSVs, JSON and a plot of proxy and Dice over rounds."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402  (PyYAML comes with Hydra)

from server.coordinator import Coordinator  # noqa: E402

TABLE_KEYS = ("dice_mean", "dice_disc", "dice_cup", "dice_proxy", "align_cos_mean", "lr_mean",
              "geo_cropped_share", "geo_zoom")  # the last two: the site's crop protocol (plain variants)


def _weighted(rounds: list[dict[str, Any]], key: str) -> float | None:
    pairs = [(r[key], r.get("images", 0)) for r in rounds if key in r]
    total = sum(n for _, n in pairs)
    return sum(v * n for v, n in pairs) / total if total else None


def site_summary(coord: Coordinator) -> dict[str, dict[str, Any]]:
    """Per site, over the whole stream: image-weighted means, counts of flags, resets and failures."""
    out = {}
    for name, rec in sorted(coord.sites.items()):
        row: dict[str, Any] = {"images": sum(r.get("images", 0) for r in rec.rounds), "rounds": len(rec.rounds)}
        for key in TABLE_KEYS:
            value = _weighted(rec.rounds, key)
            if value is not None:
                row[key] = value
        if rec.rounds and "dp_epsilon" in rec.rounds[-1]:
            row["dp_epsilon"] = rec.rounds[-1]["dp_epsilon"]
        row.update(flagged=len(rec.flagged), resets=sum(r.get("reset", 0) for r in rec.rounds),
                   failures=len(rec.failures), seconds=sum(r.get("seconds", 0.0) for r in rec.rounds))
        out[name] = row
    return out


def mean_row(summary: dict[str, dict[str, Any]]) -> dict[str, float]:
    keys = {k for row in summary.values() for k in row if k in (*TABLE_KEYS, "dp_epsilon")}
    return {k: sum(r[k] for r in summary.values() if k in r) / sum(k in r for r in summary.values()) for k in keys}


def format_sites(summary: dict[str, dict[str, Any]], title: str) -> str:
    head = f"{'site':<16}{'images':>7}{'Dice':>8}{'disc':>7}{'cup':>7}{'proxy':>8}{'cos':>7}{'flags':>6}{'eps':>7}{'crop':>6}{'zoom':>6}"
    lines = [title, head, "-" * len(head)]
    total = {"images": sum(r["images"] for r in summary.values()), "flagged": sum(r["flagged"] for r in summary.values())}
    rows = {**summary, "mean": {**mean_row(summary), **total}}
    for name, r in rows.items():
        cell = lambda k, w, f=".1f": f"{r[k]:>{w}{f}}" if k in r else f"{'-':>{w}}"  # noqa: E731
        lines.append(f"{name:<16}{r['images']:>7}{cell('dice_mean', 8, '.2f')}{cell('dice_disc', 7)}{cell('dice_cup', 7)}"
                     f"{cell('dice_proxy', 8)}{cell('align_cos_mean', 7, '.2f')}{r.get('flagged', 0):>6}{cell('dp_epsilon', 7, '.2f')}"
                     f"{cell('geo_cropped_share', 6, '.2f')}{cell('geo_zoom', 6, '.2f')}")
    return "\n".join(lines)


def plot_rounds(coord: Coordinator, path: Path, title: str) -> Path:
    """One panel per site: the Dice proxy (solid) and, where labelled, the true Dice (dashed) per round."""
    names = sorted(coord.sites)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.0), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], names):
        rounds = coord.sites[name].rounds
        x = [r["round"] for r in rounds]
        ax.plot(x, [r.get("dice_proxy", float("nan")) for r in rounds], "o-", label="Dice proxy")
        if any("dice_mean" in r for r in rounds):
            ax.plot(x, [r.get("dice_mean", float("nan")) for r in rounds], "s--", label="Dice (labels)")
        for rnd in coord.sites[name].flagged:
            ax.axvline(rnd, color="red", alpha=0.3)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("x100")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(run_dir: Path, variant: str, summary: dict, coord: Coordinator, config: dict, timing: dict) -> list[Path]:
    run_dir.mkdir(parents=True, exist_ok=True)
    files = [run_dir / "config.yaml", run_dir / "sites.csv", run_dir / "rounds.csv", run_dir / "summary.json"]
    files[0].write_text(yaml.safe_dump(config, sort_keys=False))
    keys = ["site", *sorted({k for r in summary.values() for k in r})]
    with files[1].open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows({"site": n, **r} for n, r in summary.items())
    rows = [{"site": n, **r} for n, rec in sorted(coord.sites.items()) for r in rec.rounds]
    keys = ["site", "round", *sorted({k for r in rows for k in r} - {"site", "round"})]
    with files[2].open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    files[3].write_text(json.dumps({"variant": variant, "sites": summary, "mean": mean_row(summary), "timing": timing}, indent=2))
    if coord.sites:
        files.append(plot_rounds(coord, run_dir / "rounds.png", f"{variant}: Dice proxy and Dice per round"))
    table = format_sites(summary, f"{variant}  (wall {timing['wall_s']:.0f} s, site compute {timing['client_compute_s']:.0f} s)")
    (run_dir / "sites.txt").write_text(table + "\n")
    files.append(run_dir / "sites.txt")
    print(table)
    return files


__all__ = ["format_sites", "mean_row", "plot_rounds", "site_summary", "write_report"]
