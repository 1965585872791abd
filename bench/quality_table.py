"""The quality study's table: per-image Spearman of each label-free signal with the true mean Dice.

    python -m bench.quality_table bench/results/quality_rows.jsonl [--json bench/results/quality.json]

Rows come from bench.quality_study. The calibrated estimate is fitted on the rows of target
"calibration" only (the source's own training images under simulated shifts) and then applied to
every target: target labels enter the Spearman, never the fit.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from grata.quality import FEATURES, QualityModel, derived

SIGNALS = ("estimate", "expected", "agreement", "soft_dice", "shape", "disc_expected", "cup_expected",
           "disc_agreement", "cup_agreement", "disc_soft_dice",
           "cup_soft_dice", "disc_ellipse", "cup_ellipse", "disc_solidity", "cup_solidity", "cup_in_disc",
           "disc_components", "cup_components", "step_proxy")


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def table(rows: list[dict], model: QualityModel) -> dict:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        if r["target"] != "calibration":
            groups[(r["method"], r["target"])].append({**r, **derived(r), "estimate": model.predict(r)})
    out = {}
    for (method, target), rs in sorted(groups.items()):
        dice = np.array([r["dice_mean"] for r in rs])
        cell = {"images": len(rs), "dice": float(dice.mean()), "estimate": float(np.mean([r["estimate"] for r in rs]))}
        for s in SIGNALS:
            vals = np.array([r.get(s, np.nan) for r in rs], dtype=float)
            ok = ~np.isnan(vals)
            cell[f"rho_{s}"] = float(spearmanr(vals[ok], dice[ok])[0]) if ok.sum() > 2 and np.ptp(vals[ok]) > 0 else float("nan")
        out[f"{method}/{target}"] = cell
    return out


def selection(rows: list[dict], model: QualityModel, method: str, margins=(-5.0, -2.0, 0.0, 2.0, 5.0)) -> dict:
    """Offline do-no-harm: per image, the source's prediction replaces `method`'s when the source's estimate
    leads by more than the margin. Exact for a method whose adaptation does not read its own outputs
    (the output choice feeds nothing back). Returns per target and margin the mean Dice and fallback share."""
    src = {(r["target"], r["image"]): r for r in rows if r["method"] == "source" and r["target"] != "calibration"}
    out: dict = defaultdict(dict)
    for r in rows:
        if r["method"] != method or (r["target"], r["image"]) not in src:
            continue
        s = src[(r["target"], r["image"])]
        lead = model.predict(s) - model.predict(r)
        for m in margins:
            cell = out[r["target"]].setdefault(m, {"dice": [], "fallback": [], "source": [], "method": []})
            # the method's own answer before any fallback it already applied (rows of bench.quality_study)
            alone = r.get("dice_mean_adapted", r["dice_mean"])
            cell["dice"].append(s["dice_mean"] if lead > m else alone)
            cell["fallback"].append(float(lead > m))
            cell["source"].append(s["dice_mean"])
            cell["method"].append(alone)
    return {t: {m: {k: float(np.mean(v)) for k, v in c.items()} for m, c in ms.items()} for t, ms in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("rows", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--checkpoint", help="use the checkpoint's fitted quality model instead of fitting on the rows")
    args = ap.parse_args()
    rows = load(args.rows)
    calib = [r for r in rows if r["target"] == "calibration"]
    if args.checkpoint:
        import torch
        model = QualityModel.from_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True)["quality"])
    else:
        model = QualityModel.fit(calib, [r["dice"] for r in calib], list(FEATURES))
    cells = table(rows, model)
    sig = ("estimate", "expected", "cup_expected", "agreement", "soft_dice", "shape", "step_proxy")
    print(f"{'method/target':<24}{'n':>4}{'dice':>7}{'est':>7}" + "".join(f"{s[:10]:>11}" for s in sig))
    for key, c in cells.items():
        print(f"{key:<24}{c['images']:>4}{c['dice']:>7.1f}{c['estimate']:>7.1f}" + "".join(f"{c['rho_' + s]:>11.2f}" for s in sig))
    picks = {m: selection(rows, model, m) for m in sorted({r["method"] for r in rows} - {"source"})}
    for method, targets in picks.items():
        print(f"\ndo-no-harm for {method}: mean Dice (fallback share) by margin; source | {method} alone")
        for target, ms in sorted(targets.items()):
            any_m = next(iter(ms.values()))
            print(f"  {target:<12} source {any_m['source']:.2f} | alone {any_m['method']:.2f} | " + "  ".join(
                f"m={m:+.0f}: {c['dice']:.2f} ({c['fallback']:.2f})" for m, c in ms.items()))
    if args.json:
        args.json.write_text(json.dumps({"fit": model.to_dict(), "cells": cells, "selection": picks}, indent=2))


if __name__ == "__main__":
    main()
