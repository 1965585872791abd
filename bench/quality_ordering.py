"""Is the four real sites' Dice order a property of the sites, or of which images were labelled?

    python -m bench.quality_ordering [--dumps bench/results] [--method fedgrata] [--resamples 2000]

Reads the per-image dumps of `bench.quality_dump` (true Dice and the label-free estimate per image,
one file per site) and resamples each site's images with replacement (a bootstrap: another draw of
images from the same site). Reports each site's mean true Dice with its standard error, how often a
resample reproduces the full order of the four sites, and each pair's probability of keeping its
order; the same for the label-free estimate (version 2 less its constant offset: the site proxy's order). Writes
bench/results/quality_ordering.json. No model runs: seconds.
"""
from __future__ import annotations

import argparse
import gzip
import itertools
import json
from pathlib import Path

import numpy as np

from bench.common import publish, table

SITES = ("RIM_ONE_r1", "RIM_ONE_r3", "Drishti_GS", "RIM_ONE_r2")


def order_stability(values: dict[str, np.ndarray], resamples: int, seed: int = 0) -> dict:
    """values: site -> per-image values [n_site]. Returns the full-data order (best first), the share
    of bootstrap resamples that reproduce it, and each ordered pair's share of resamples keeping it."""
    rng = np.random.default_rng(seed)
    means = {s: float(v.mean()) for s, v in values.items()}
    order = sorted(values, key=lambda s: -means[s])
    boot = {s: np.array([v[rng.integers(0, len(v), len(v))].mean() for _ in range(resamples)]) for s, v in values.items()}
    stacked = np.stack([boot[s] for s in order])  # [sites, resamples], in the full-data order
    same = float(np.mean(np.all(stacked[:-1] > stacked[1:], axis=0)))
    pairs = {f"{a} > {b}": float(np.mean(boot[a] > boot[b])) for a, b in itertools.combinations(order, 2)}
    return {"order": order, "means": means, "reproduced": same, "pairs": pairs,
            "se": {s: float(v.std(ddof=1) / np.sqrt(len(v))) for s, v in values.items()}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dumps", type=Path, default=Path("bench/results"))
    parser.add_argument("--method", default="fedgrata")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    rows = {}
    for site in SITES:
        path = args.dumps / f"quality_dump_{args.method}_{site}.json.gz"
        if not path.is_file():
            raise SystemExit(f"{path}: missing; write it with python -m bench.quality_dump")
        rows[site] = json.loads(gzip.open(path).read())
    truth = order_stability({s: np.array([r["dice_mean"] for r in v]) for s, v in rows.items()}, args.resamples)
    # quality version 2 (grata/quality.py): the mean of disc and cup expected Dice, plus the source's
    # constant offset, which moves every site alike and is left out here
    proxy = order_stability({s: np.array([(r["disc_expected"] + r["cup_expected"]) / 2 for r in v])
                             for s, v in rows.items()}, args.resamples)
    lines = [{"site": s, "images": len(rows[s]), "dice": truth["means"][s], "dice_se": truth["se"][s],
              "estimate": proxy["means"][s], "estimate_se": proxy["se"][s]} for s in SITES]
    md = table(lines, [("site", "site", ""), ("images", "images", "d"), ("dice", "true Dice", ".2f"),
                       ("dice_se", "± se", ".2f"), ("estimate", "estimate", ".2f"), ("estimate_se", "± se", ".2f")])
    md += (f"\n\ntrue order {' > '.join(truth['order'])}: reproduced by {truth['reproduced']:.1%} of "
           f"{args.resamples} resamples of the labelled images\n")
    md += "\n".join(f"  P({k}) = {v:.3f}" for k, v in truth["pairs"].items())
    md += f"\n\nestimate's order {' > '.join(proxy['order'])}"
    publish("quality_ordering", args, md, truth=truth, estimate=proxy, sites=lines)
    return {"truth": truth, "estimate": proxy}


if __name__ == "__main__":
    main()
