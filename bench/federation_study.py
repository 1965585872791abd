"""Federation scenarios: does sharing pay where hospitals share a device, and do no harm where they differ?

    python -m bench.federation_study --scenario vendors [--data synthetic|fundus] [--variants local_only fed_kin ...]
    python -m bench.federation_study --scenario vendors --from runs/.../compare-<time> [...]  # summarise finished compares

Runs `simulations.compare scenario=<name>` in this process (engine=inline: the sites in turn, the same
code as the Flower simulation) or reads a finished comparison folder, then reports per variant: each
site's stream Dice (mean of disc and cup, x100), the image-weighted mean (summary.json), the epsilon
each site's ledger holds, the late joiners' first-round Dice, and the issue's targets against
local_only:
  vendors      best federated variant at epsilon <= 8: mean >= local_only + 1.0, no site < local_only - 0.5
  distinct     no site of any federated variant more than 0.3 below local_only
  late_joiner  the joiners' first-round Dice >= local_only's joiners' + 2
Writes bench/results/federation_<scenario>_<data>.{json,md}; for synthetic data also
docs/img/federation_<scenario>.png (real-data numbers stay tables: the data's terms).
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

TARGETS = {"vendors": "mean +1.0 over local_only at epsilon <= 8, no site below it by more than 0.5",
           "distinct": "no site more than 0.3 below local_only",
           "late_joiner": "joiners' first-round Dice at least 2 above local_only's joiners"}
EPSILON_MAX = 8.0


def run_compare(args: argparse.Namespace) -> Path:
    from server.config import load_config
    from simulations.compare import compare

    overrides = [f"scenario={args.scenario}", "engine=inline", "mlflow.overlays=0",
                 f"variants=[{','.join(args.variants)}]", f"data={args.data}",  # synthetic: the 128 px setup
                 f"out_dir=runs/federation_study/{args.scenario}_{args.data}", *args.overrides]
    results = compare(load_config(overrides), Path.cwd())
    return Path(next(iter(results.values()))["run_dir"]).parent


def first_round(run_dir: Path, sites: list[str]) -> dict[str, float]:
    """Each site's Dice in its first round with images (rounds.csv)."""
    out: dict[str, float] = {}
    with (run_dir / "rounds.csv").open() as fh:
        for row in sorted(csv.DictReader(fh), key=lambda r: int(r["round"])):
            if row["site"] in sites and row["site"] not in out and float(row.get("images") or 0) > 0 and row.get("dice_mean"):
                out[row["site"]] = float(row["dice_mean"])
    return out


def study(folders: list[Path], scenario: str, joiners: list[str]) -> dict:
    """Per variant: sites, mean, epsilon, joiners' first-round Dice; and the targets against local_only.
    Several comparison folders of the same scenario (one variant each, say) are read as one."""
    summary, full = {}, {}
    for folder in folders:
        summary.update(json.loads((folder / "summary.json").read_text())["variants"])
        full = {**json.loads((folder / "compare.json").read_text()), **full}
    rows = {}
    for name, entry in summary.items():
        sites = full[name]["sites"]
        eps = max((s.get("dp_epsilon", 0.0) for s in sites.values()), default=0.0)
        row = {"sites": entry["sites"], "dice_mean": entry["dice_mean"], "epsilon": eps,
               "private": any("dp_epsilon" in s for s in sites.values())}
        if joiners:
            first = first_round(Path(full[name]["run_dir"]), joiners)
            row["joiners_first_round"] = sum(first.values()) / len(first) if first else None
            row["joiners_first_round_sites"] = first
        rows[name] = row
    if "source" in full:
        src = full["source"]["sites"]
        total = sum(r["images"] for r in src.values())
        rows = {"source": {"sites": {s: r["dice_mean"] for s, r in src.items()},
                           "dice_mean": sum(r["dice_mean"] * r["images"] for r in src.values()) / total,
                           "epsilon": 0.0, "private": False}, **rows}
    return {"scenario": scenario, "folders": [str(f) for f in folders], "variants": rows, "targets": targets(scenario, rows)}


def targets(scenario: str, rows: dict[str, dict]) -> dict:
    """The issue's target for this scenario, per federated variant, against local_only."""
    base = rows.get("local_only")
    if base is None:
        return {}
    out = {}
    for name, row in rows.items():
        if name in ("local_only", "source"):
            continue
        diffs = {s: row["sites"][s] - base["sites"][s] for s in base["sites"] if s in row["sites"]}
        gain, worst = row["dice_mean"] - base["dice_mean"], min(diffs.values())
        entry = {"gain": gain, "worst_site": worst, "epsilon": row["epsilon"], "private": row["private"]}
        if scenario == "vendors":
            entry["met"] = row["private"] and row["epsilon"] <= EPSILON_MAX + 1e-9 and gain >= 1.0 and worst >= -0.5
        elif scenario == "distinct":
            entry["met"] = worst >= -0.3
        elif scenario == "late_joiner" and row.get("joiners_first_round") is not None and base.get("joiners_first_round"):
            entry["joiners_gain"] = row["joiners_first_round"] - base["joiners_first_round"]
            entry["met"] = entry["joiners_gain"] >= 2.0
        out[name] = entry
    return out


def markdown(result: dict) -> str:
    """Sites as rows, variants as columns (a scenario has up to 12 hospitals), then the mean, epsilon
    and, for late joiners, their first-round Dice."""
    rows = result["variants"]
    names = list(rows)
    sites = list(next(r for n, r in rows.items() if n != "source")["sites"])
    lines = ["| site | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for s in sites:
        lines.append(f"| {s} | " + " | ".join(f"{rows[n]['sites'].get(s, float('nan')):.2f}" for n in names) + " |")
    lines.append("| **mean (image-weighted)** | " + " | ".join(f"**{rows[n]['dice_mean']:.2f}**" for n in names) + " |")
    eps = ["-" if n == "source" else f"{rows[n]['epsilon']:.2f}" if rows[n]["private"] else "none (exact values)"
           for n in names]
    lines.append("| epsilon spent (max over sites) | " + " | ".join(eps) + " |")
    if any("joiners_first_round" in r for r in rows.values()):
        lines.append("| joiners' first-round Dice | " + " | ".join(
            f"{rows[n]['joiners_first_round']:.2f}" if rows[n].get("joiners_first_round") is not None else "-"
            for n in names) + " |")
    lines.append("")
    lines.append(f"Target ({TARGETS[result['scenario']]}):")
    for name, t in result["targets"].items():
        more = f", joiners {t['joiners_gain']:+.2f}" if "joiners_gain" in t else ""
        lines.append(f"- {name}: mean {t['gain']:+.2f}, worst site {t['worst_site']:+.2f}{more} -> "
                     f"{'met' if t.get('met') else 'not met'}")
    return "\n".join(lines)


def plot(result: dict, path: Path, title: str) -> None:
    from bench.common import pyplot, save_figure  # torch comes with bench.common: only when plotting

    plt = pyplot()

    rows = {n: r for n, r in result["variants"].items()}
    sites = list(next(r for n, r in rows.items() if n != "source")["sites"])
    cols = [*sites, "mean"]
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(min(16.0, 0.75 * len(cols) * max(2, len(rows)) / 2 + 3), 4.2))
    for i, (name, r) in enumerate(rows.items()):
        xs = [c + (i - (len(rows) - 1) / 2) * width for c in range(len(cols))]
        ax.bar(xs, [r["sites"].get(s, 0.0) for s in sites] + [r["dice_mean"]], width, label=name)
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("Dice x100 (mean of disc and cup)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=len(rows), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", required=True, choices=sorted(TARGETS))
    parser.add_argument("--data", default="synthetic", choices=("synthetic", "fundus"),
                        help="synthetic: the 128 px setup and its source model (ResUNet-18); fundus: the real domains")
    parser.add_argument("--variants", nargs="+", default=["local_only", "fed_kin", "fed_stats", "fed_affine"])
    parser.add_argument("--from", dest="source", type=Path, nargs="+", help="finished comparison folder(s) to summarise")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--overrides", nargs="*", default=[], help="more Hydra overrides")
    args = parser.parse_args(argv)
    folders = args.source or [run_compare(args)]
    from server.config import load_config

    cfg = load_config([f"scenario={args.scenario}", f"data={args.data}"])
    joiners = sorted(getattr(cfg.scenario, args.data).join_round)
    result = study(folders, args.scenario, joiners)
    text = markdown(result)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"federation_{args.scenario}_{args.data}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{stem}.md").write_text(text + "\n")
    if args.data == "synthetic":
        plot(result, Path("docs/img") / f"federation_{args.scenario}.png",
             f"scenario {args.scenario}: synthetic hospitals, ResUNet-18 at 128 px, fedgrata; Dice per site by variant")
    return result


if __name__ == "__main__":
    main()
