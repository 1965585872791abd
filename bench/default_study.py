"""The study behind fedgrata's default: many method variants on the first N images of each target.

    python -m bench.default_study bench/grids/statistics.json --limit 40 [--threads 1]

A grid is a JSON object {row name: {"adapter": ..., "options": {...}}}. Uses the fundus preset
(ResUNet-34, 256 px, source RIM_ONE_r2, targets RIM_ONE_r1, RIM_ONE_r3, Drishti_GS) and its
checkpoint; prints one line per row as it finishes and writes the rows to --out as JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import time
from pathlib import Path

import torch

from grata.config import DataConfig
from grata.models import load_checkpoint
from simulations.evaluate import MethodConfig, evaluate_method


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid", type=Path)
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--root", default="../shared/data/fundus")
    parser.add_argument("--checkpoint", default="checkpoints/source_fundus_RIM_ONE_r2_resnet34_256.pt")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    grid = json.loads(args.grid.read_text())
    model, meta = load_checkpoint(args.checkpoint)
    data = DataConfig(kind="fundus", root=args.root, size=256, source="RIM_ONE_r2",
                      targets=["RIM_ONE_r1", "RIM_ONE_r3", "Drishti_GS"], target_split="all")
    rows = {}
    for name, spec in grid.items():
        t0 = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):  # one line per row, not per image
            res, _ = evaluate_method(name, MethodConfig(spec["adapter"], spec.get("options", {})), model, data, None,
                                     args.limit, shift_reference=meta.get("shift_reference"))
        rows[name] = {t: res[t] for t in [*data.targets, "mean"]}
        cells = "  ".join(f"{res[t]['dice_mean']:5.1f} ({res[t]['dice_disc']:4.1f}/{res[t]['dice_cup']:4.1f})"
                          for t in [*data.targets, "mean"])
        print(f"{name:28s} {cells}  [{time.perf_counter() - t0:.0f}s]", flush=True)
    out = args.out or Path("runs/default_study") / f"{args.grid.stem}_limit{args.limit}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"grid": grid, "limit": args.limit, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
