"""Score every quality candidate on the dumps of bench.quality_dump, in seconds (no model runs).

    python -m bench.quality_candidates [--dumps bench/results] [--json bench/results/quality_candidates.json]

Per (method, target): per-image Spearman of each candidate signal with the true mean Dice, the site
proxy (mean estimate) against the true mean Dice, and the offline do-no-harm (per image, the source
model's prediction on the same crop when its estimate leads). Every refit is fitted on the rows of
target "calibration" only (the source's own training images under simulated acquisition and
geometry shifts): target labels enter the scores, never a fit.
"""
from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from grata.quality import FEATURES, QualityModel, derived

TARGETS = ("RIM_ONE_r1", "RIM_ONE_r3", "Drishti_GS", "RIM_ONE_r2")


def consistency(r: dict) -> dict[str, float]:
    """The frame-consistency features as "higher is better" signals (0 = consistent)."""
    share = max(r["geo_crop_share"], 1e-4)
    return {"geo_det_fit": -r["geo_det_scale"], "geo_det_near": -r["geo_det_shift"],
            "geo_probe_fit": -r["geo_probe_scale"], "geo_crop_centred": -r["geo_crop_offset"],
            "geo_crop_inside": -r["geo_crop_edge"], "geo_crop_scale": -abs(np.log(share / r["geo_ref_share"])),
            "cup_weighted": 0.75 * r["cup_expected"] + 0.25 * r["disc_expected"],
            "frame_expected": (r["frame_disc_expected"] + r["frame_cup_expected"]) / 2}


def enrich(r: dict) -> dict:
    return {**r, **derived(r), **consistency(r)}


REFITS = {
    "refit 4 ensemble (geometry calibration)": list(FEATURES),
    "4 ensemble + geometry consistency": [*FEATURES, "geo_det_fit", "geo_det_near", "geo_det_iou",
                                          "geo_crop_centred", "geo_crop_inside", "geo_crop_scale"],
    "4 ensemble + det iou + crop scale": [*FEATURES, "geo_det_iou", "geo_crop_scale"],
    "4 ensemble + frame ensemble": [*FEATURES, "frame_disc_expected", "frame_cup_expected",
                                    "frame_disc_agreement", "frame_cup_agreement"],
    "cup expected + geometry": ["cup_expected", "cup_agreement", "geo_det_iou", "geo_crop_scale", "geo_crop_inside"],
}
SIGNALS = ("step_quality", "expected", "cup_expected", "disc_expected", "cup_weighted", "agreement",
           "cup_agreement", "disc_agreement", "frame_expected", "frame_cup_expected", "geo_det_iou", "geo_det_fit",
           "geo_det_near", "geo_probe_iou", "geo_probe_fit", "geo_crop_centred", "geo_crop_inside", "geo_crop_scale",
           "step_proxy")


def load(folder: Path) -> tuple[list[dict], list[dict]]:
    rows, calib = [], []
    for p in sorted([*folder.glob("quality_dump_*.json"), *folder.glob("quality_dump_*.json.gz")]):
        text = gzip.decompress(p.read_bytes()).decode() if p.suffix == ".gz" else p.read_text()
        for r in json.loads(text):
            (calib if r["target"] == "calibration" else rows).append(enrich(r))
    return rows, calib


def rho(x, y) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = ~np.isnan(x)
    return float(spearmanr(x[ok], y[ok])[0]) if ok.sum() > 2 and np.ptp(x[ok]) > 0 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dumps", type=Path, default=Path("bench/results"))
    ap.add_argument("--checkpoint", default="checkpoints/source_fundus_RIM_ONE_r2_resnet34_256.pt")
    ap.add_argument("--final", default="checkpoints/q2_source_fundus_RIM_ONE_r2_resnet34_256.pt",
                    help="a checkpoint holding the version-2 quality model (bench.quality_refit), if present")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows, calib = load(args.dumps)
    stored = QualityModel.from_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True)["quality"])
    models = {"stored estimate (4 ensemble, acquisition calibration)": stored}
    if Path(args.final).is_file():
        models["final estimate v2 (expected + source offset)"] = QualityModel.from_dict(
            torch.load(args.final, map_location="cpu", weights_only=True)["quality"])
    for name, names in REFITS.items():
        if calib:
            models[name] = QualityModel.fit(calib, [r["dice_mean"] for r in calib], names)
    groups: dict[str, dict[str, list[dict]]] = defaultdict(dict)
    for r in rows:
        groups[r["method"]].setdefault(r["target"], []).append(r)
    out: dict = {"calibration_rows": len(calib), "models": {k: m.to_dict() for k, m in models.items()}, "cells": {}}
    if calib:
        out["calibration"] = {name: rho([m.predict(r) for r in calib], [r["dice_mean"] for r in calib])
                              for name, m in models.items()}
    for method, targets in sorted(groups.items()):
        names = [t for t in TARGETS if t in targets]
        print(f"\n## {method}\n\n| signal | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names))
        cells = {}
        for name, m in models.items():
            cells[name] = {t: rho([m.predict(r) for r in targets[t]], [r["dice_mean"] for r in targets[t]]) for t in names}
        for s in SIGNALS:
            cells[s] = {t: rho([r.get(s, np.nan) for r in targets[t]], [r["dice_mean"] for r in targets[t]]) for t in names}
        for s, c in cells.items():
            print(f"| {s} | " + " | ".join(f"{c[t]:.2f}" for t in names) + " |")
        print("\n| site | true Dice | " + " | ".join(models) + " |\n|---|---:|" + "---:|" * len(models))
        proxies = {}
        for t in names:
            proxies[t] = {"dice": float(np.mean([r["dice_mean"] for r in targets[t]])),
                          **{k: float(np.mean([m.predict(r) for r in targets[t]])) for k, m in models.items()}}
            print(f"| {t} | {proxies[t]['dice']:.2f} | " + " | ".join(f"{proxies[t][k]:.2f}" for k in models) + " |")
        fallback = {}
        if "src_cup_expected" in targets[names[0]][0] and method != "source":
            print("\noffline fallback (source's prediction on the same crop when its estimate leads):")
            for k, m in models.items():
                fallback[k] = {}
                for t in names:
                    pick = []
                    for r in targets[t]:
                        src = {key[4:]: v for key, v in r.items() if key.startswith("src_")}
                        lead = m.predict({**r, **src}) - m.predict(r)  # same crop and frame, the source's features
                        pick.append((r["dice_mean_source"] if lead > 0 else r["dice_mean_adapted"], lead > 0))
                    fallback[k][t] = {"dice": float(np.mean([p[0] for p in pick])), "share": float(np.mean([p[1] for p in pick])),
                                      "alone": float(np.mean([r["dice_mean_adapted"] for r in targets[t]]))}
                print(f"  {k[:40]:<40} " + "  ".join(f"{t}: {v['alone']:.2f}->{v['dice']:.2f} ({v['share']:.2f})"
                                                     for t, v in fallback[k].items()))
        out["cells"][method] = {"rho": cells, "proxy": proxies, "fallback": fallback}
    if calib:
        print("\ncalibration Spearman (in-sample):", {k: round(v, 2) for k, v in out["calibration"].items()})
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
