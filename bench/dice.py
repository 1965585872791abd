"""Does the fast path change the result? Dice of fast vs faithful fp32 on the real fundus targets.

    python -m bench.dice [--methods grata_paper fedgrata] [--split test] [--limit 0]

The fundus preset (ResUNet-34, 256 px, source RIM_ONE_r2, checkpoint from `make train-fundus`);
targets are the federation's four sites (Drishti_GS, RIM_ONE_r1, RIM_ONE_r2 as the in-domain
control, RIM_ONE_r3) over their test images, or `--split all`. Each method runs the paper's online
protocol twice, `speed=faithful` and `speed=fast`, with the same seed; the table gives both Dice
and the difference per target, the mean over targets and over images, and seconds per image.
"""
from __future__ import annotations

import argparse
import contextlib
import io
from pathlib import Path

import numpy as np

from bench.common import publish, table

SPEEDS = ("faithful", "fast")


def run(methods: list[str], split: str, limit: int, root: str) -> list[dict]:
    import simulations.evaluate as ev  # registers the evaluate schema
    from grata.models import load_checkpoint
    from grata.train_source import default_checkpoint
    from server.config import load_config

    cfg = load_config(["data=fundus", f"data.root={root}", f"data.target_split={split}"], config_name="evaluate")
    cfg.data.targets = list(cfg.data.sites)
    checkpoint = Path(cfg.checkpoint or default_checkpoint(cfg))
    if not Path(cfg.data.root).is_dir():
        raise SystemExit(f"no fundus data at {cfg.data.root}; pass --root")
    if not checkpoint.is_file():
        raise SystemExit(f"no fundus source model at {checkpoint}: run `make train-fundus` first (about 45 min on 2 cores)")
    model, meta = load_checkpoint(checkpoint, expect=cfg.model)
    rows = []
    for method in methods:
        base = cfg.methods[method]
        got = {}
        for speed in SPEEDS:
            m = ev.MethodConfig(base.adapter, {**base.options, "speed": speed})
            print(f"{method} ({speed}) on {', '.join(cfg.data.targets)} ...", flush=True)
            with contextlib.redirect_stdout(io.StringIO()):
                summary, records = ev.evaluate_method(f"{method}/{speed}", m, model, cfg.data, None, limit, cfg.seed,
                                                      meta.get("shift_reference"))
            got[speed] = (summary, records)
        for target in [*cfg.data.targets, "mean", "images"]:
            row = {"method": method, "target": target}
            for speed in SPEEDS:
                summary, records = got[speed]
                if target == "images":  # image-weighted mean over all targets
                    row[speed] = float(np.mean([r["dice_mean"] for r in records]))
                    row[f"{speed}_s"] = float(np.mean([summary[t]["seconds_per_image"] for t in cfg.data.targets]))
                    row["n"] = len(records)
                else:
                    row[speed] = summary[target]["dice_mean"]
                    if target != "mean":
                        row[f"{speed}_s"], row["n"] = summary[target]["seconds_per_image"], summary[target]["images"]
            row["diff"] = row["fast"] - row["faithful"]
            if target == "images":
                per_image = np.array([f["dice_mean"] - s["dice_mean"] for f, s in zip(got["fast"][1], got["faithful"][1])])
                row["max_abs_image_diff"] = float(np.abs(per_image).max())
            rows.append(row)
            print(f"  {target:<12} faithful {row['faithful']:.2f}  fast {row['fast']:.2f}  diff {row['diff']:+.2f}", flush=True)
    return rows


def dice_table(rows: list[dict]) -> str:
    return table(rows, [("method", "method", ""), ("target", "target", ""), ("n", "images", ""),
                        ("faithful", "Dice fp32 faithful", ".2f"), ("fast", "Dice fast", ".2f"), ("diff", "fast - fp32", "+.2f"),
                        ("faithful_s", "fp32 s/img", ".2f"), ("fast_s", "fast s/img", ".2f")])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["grata_paper", "fedgrata"])
    parser.add_argument("--split", default="test", choices=["test", "all"])
    parser.add_argument("--limit", type=int, default=0, help="images per target (0: all)")
    parser.add_argument("--root", default="../shared/data/fundus")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    rows = run(args.methods, args.split, args.limit, args.root)
    publish("dice", args, dice_table(rows), model="ResUNet-34, 256 px, source RIM_ONE_r2", rows=rows)
    return rows


if __name__ == "__main__":
    main()
