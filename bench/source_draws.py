"""Does the paper-protocol result belong to the method or to one source model? Retrainings compared.

    python -m bench.source_draws --draw seed0 runs/evaluate/bf16_a runs/evaluate/bf16_b runs/evaluate/bf16_c \\
        --draw seed1 runs/evaluate/seed1_a runs/evaluate/seed1_b runs/evaluate/seed1_c ... \\
        [--plot docs/img/source_draws.png]

A draw is one source model of one recipe (RIM_ONE_r2, ResUNet-34, 256 px, 30 epochs; another
`train.seed`), evaluated with `simulations.evaluate "run=[source,fedgrata]"` on every image of the
targets and on the source's held-out test split. Its run folders' `per_image.csv` are read, no model
runs; `FOLDER:METHOD` takes one method's rows from a folder (a variant's run beside the source rows
of another). Per draw: each method's Dice per target, fedgrata's gain over the source (issue 12's
bar: the mean of the three targets at least +1.5, no target below -0.3), the label-free estimate's
per-image Spearman with true Dice, and how many of the six pairs of sites the site proxy (mean
estimate) orders as their true Dice does. Across draws: the spread of each, so a claim can say which
part is the method's and which the source model's.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
from pathlib import Path

import numpy as np

from bench.common import publish, pyplot, save_figure, table
from simulations.evaluate import spearman

TARGETS = ("RIM_ONE_r1", "RIM_ONE_r3", "Drishti_GS")
SITES = (*TARGETS, "RIM_ONE_r2")  # the site proxy is judged on the four real sites, the source's test split included
METHODS = ("source", "fedgrata")


def read_draw(folders: list[str]) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """method -> target -> {"image": [n], "dice": [n], "quality": [n]} from the folders' per_image.csv;
    FOLDER:METHOD takes only that method's rows (one variant's run beside the source rows of another)."""
    rows: dict[str, dict[str, dict[str, list]]] = {}
    for spec in folders:
        folder, _, only = spec.partition(":")
        path = Path(folder) / "per_image.csv"
        if not path.is_file():
            raise SystemExit(f"{path}: missing; run simulations.evaluate with out_dir={folder}")
        with path.open() as f:
            for r in csv.DictReader(f):
                if only and r["method"] != only:
                    continue
                if not r.get("quality"):
                    raise SystemExit(f"{path}: image {r['image']} has no quality estimate (a checkpoint without a quality model?)")
                cell = rows.setdefault(r["method"], {}).setdefault(r["target"], {"image": [], "dice": [], "quality": []})
                cell["image"].append(r["image"])
                cell["dice"].append(float(r["dice_mean"]))
                cell["quality"].append(float(r["quality"]))
    missing = [(m, t) for m in METHODS for t in SITES if t not in rows.get(m, {})]
    if missing:
        raise SystemExit(f"{', '.join(folders)}: no rows for {missing}")
    return {m: {t: {k: np.asarray(v) for k, v in c.items()} for t, c in ts.items()} for m, ts in rows.items()}


def pairs_ordered(estimate: dict[str, float], truth: dict[str, float]) -> int:
    """How many of the sites' pairs the estimate orders as the truth does."""
    return sum((estimate[a] - estimate[b]) * (truth[a] - truth[b]) > 0 for a, b in itertools.combinations(truth, 2))


def summarise(draw: dict[str, dict[str, dict[str, np.ndarray]]]) -> dict:
    """One draw's numbers: per method and site mean Dice, mean estimate and Spearman; the bar's figures."""
    out: dict = {"sites": {}}
    for m in METHODS:
        for t in SITES:
            c = draw[m][t]
            out["sites"].setdefault(t, {})[m] = {"images": int(c["dice"].size), "dice": float(c["dice"].mean()),
                                                 "proxy": float(c["quality"].mean()),
                                                 "spearman": spearman(list(c["quality"]), list(c["dice"]))}
    gains = {t: out["sites"][t]["fedgrata"]["dice"] - out["sites"][t]["source"]["dice"] for t in TARGETS}
    out["gain"] = gains
    for m in METHODS:
        out[f"{m}_mean"] = float(np.mean([out["sites"][t][m]["dice"] for t in TARGETS]))
    out["gain_mean"] = out["fedgrata_mean"] - out["source_mean"]
    out["table_bar_met"] = bool(out["gain_mean"] >= 1.5 and min(gains.values()) >= -0.3)
    out["spearman_bar_met"] = bool(min(out["sites"][t]["fedgrata"]["spearman"] for t in SITES) >= 0.6)
    f = {t: out["sites"][t]["fedgrata"] for t in SITES}
    out["proxy_pairs"] = pairs_ordered({t: f[t]["proxy"] for t in SITES}, {t: f[t]["dice"] for t in SITES})
    return out


def rows_for(name: str, s: dict) -> list[dict]:
    """Table rows: one per method, targets and the source's test split as columns."""
    rows = []
    for m in METHODS:
        row = {"draw": name, "method": m, "mean": s[f"{m}_mean"]}
        for t in SITES:
            row[t] = s["sites"][t][m]["dice"]
            row[f"rho_{t}"] = s["sites"][t][m]["spearman"]
        if m == "fedgrata":
            row["gain"] = s["gain_mean"]
            row["worst"] = min(s["gain"].values())
            row["pairs"] = f"{s['proxy_pairs']} of 6"
        rows.append(row)
    return rows


def plot(summaries: dict[str, dict], path: Path) -> None:
    plt = pyplot()

    names = list(summaries)
    # a draw named <model>_<config> is coloured by its config, so configs read across models
    config = {n: n.rsplit("_", 1)[-1] for n in names}
    colour = {c: plt.cm.tab10(i) for i, c in enumerate(dict.fromkeys(config.values()))}
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.8 / len(names)
    labelled: set[str] = set()
    for i, n in enumerate(names):
        s, c = summaries[n], config[n]
        label = None if c in labelled else c  # one legend entry per config
        labelled.add(c)
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(TARGETS) + 1)]
        left.bar(xs, [s["gain"][t] for t in TARGETS] + [s["gain_mean"]], width, color=colour[c], edgecolor="white", lw=0.3,
                 label=label)
        right.bar(xs[: len(SITES)], [s["sites"][t]["fedgrata"]["spearman"] for t in SITES], width, color=colour[c],
                  edgecolor="white", lw=0.3, label=label)
    left.axhline(1.5, color="k", ls="--", lw=1, label="bar for the mean (+1.5)")
    left.axhline(0, color="k", lw=0.5)
    left.set_xticks(range(len(TARGETS) + 1), [*TARGETS, "mean"])
    left.set_ylabel("fedgrata - source (Dice x100)")
    left.set_title("gain over each model's own source prediction", fontsize=10)
    right.axhline(0.6, color="k", ls="--", lw=1, label="bar (0.6)")
    right.set_xticks(range(len(SITES)), [*TARGETS, "RIM_ONE_r2 test"])
    right.set_ylabel("Spearman (estimate vs true Dice)")
    right.set_title("label-free estimate, per image, fedgrata", fontsize=10)
    for ax in (left, right):
        ax.tick_params(axis="x", labelsize=8)
    left.legend(fontsize=7, loc="upper left")
    right.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Source-model retrainings (RIM_ONE_r2, ResUNet-34, 256 px); bars left to right: {', '.join(names)}",
                 fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draw", nargs="+", action="append", required=True, metavar=("NAME", "FOLDER"),
                        help="a draw's name, then its evaluate run folders (FOLDER:METHOD: that method's rows only)")
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--name", default="source_draws")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    summaries, per_image = {}, {}
    for name, *folders in args.draw:
        if not folders:
            raise SystemExit(f"--draw {name}: give its run folders after the name")
        draw = read_draw(folders)
        summaries[name] = summarise(draw)
        per_image[name] = {m: {t: {k: v.tolist() for k, v in c.items()} for t, c in ts.items()} for m, ts in draw.items()}
    rows = [r for n, s in summaries.items() for r in rows_for(n, s)]
    cols = [("draw", "draw", ""), ("method", "method", ""), *[(t, t, ".2f") for t in SITES],
            ("mean", "mean of 3 targets", ".2f"), ("gain", "gain", "+.2f"), ("worst", "worst target", "+.2f"),
            *[(f"rho_{t}", f"rho {t}", ".3f") for t in SITES], ("pairs", "proxy pairs right", "")]
    gains = np.array([s["gain_mean"] for s in summaries.values()])
    across = {"draws": len(gains), "gain_mean": float(gains.mean()), "gain_sd": float(gains.std(ddof=1)) if gains.size > 1 else 0.0,
              "fedgrata_mean": [s["fedgrata_mean"] for s in summaries.values()],
              "source_mean": [s["source_mean"] for s in summaries.values()],
              "table_bar_met": sum(s["table_bar_met"] for s in summaries.values()),
              "spearman_bar_met": sum(s["spearman_bar_met"] for s in summaries.values())}
    text = table(rows, cols) + (
        f"\n\nacross {across['draws']} draws: gain {across['gain_mean']:+.2f} (sd {across['gain_sd']:.2f}); "
        f"table bar met in {across['table_bar_met']}, Spearman >= 0.6 on every site in {across['spearman_bar_met']}")
    if args.plot:
        plot(summaries, args.plot)
    publish(args.name, args, text, summaries=summaries, across=across, per_image=per_image)
    return {"summaries": summaries, "across": across}


if __name__ == "__main__":
    main()
