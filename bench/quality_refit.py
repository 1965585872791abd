"""Refit a checkpoint's quality model (grata.quality.fit_quality, version 2) into a copy,
weights untouched: what `ensure_source` does to an older checkpoint, on a named file.

    python -m bench.quality_refit --checkpoint <old.pt> --out <new.pt> [--root ../shared/data/fundus]
"""
from __future__ import annotations

import argparse
import time

from bench.quality_study import SOURCE, _stack, open_split
from grata.geometry import ensure_reference
from grata.models import load_checkpoint, save_checkpoint
from grata.quality import fit_quality


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", choices=sorted(SOURCE), default="fundus")
    ap.add_argument("--root", default="../shared/data/fundus")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--images", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--copies", type=int, default=0, help="shifted copies scored only for the record")
    args = ap.parse_args()
    model, meta = load_checkpoint(args.checkpoint)
    images, masks = _stack(open_split(args.data, args.root, SOURCE[args.data], "train", args.size))
    ensure_reference(meta, lambda: (images, masks))
    t0 = time.perf_counter()
    meta["quality"] = fit_quality(model.eval(), images, masks, limit=args.images, seed=args.seed, copies=args.copies)
    save_checkpoint(args.out, model, **meta)
    q = meta["quality"]
    print(f"{args.out}: quality v{q['info']['version']} on {q['info']['images']} images "
          f"({time.perf_counter() - t0:.0f}s): " + ", ".join(f"{n} {c:.2f}" for n, c in zip(q["names"], q["coef"]))
          + f", intercept {q['intercept']:.2f}")


if __name__ == "__main__":
    main()
