"""Collect, per image, label-free quality features and the true Dice, for the quality study.

    python -m bench.quality_study --checkpoint checkpoints/source_fundus_RIM_ONE_r2_resnet34_256.pt \
        --out bench/results/quality_rows.jsonl [--limit N] [--methods source fedgrata]

For every real target (all images) and the in-domain RIM_ONE_r2 test split (or, with --data synthetic,
every synthetic style's test images), each method adapts
online as in the paper's protocol; every image's row holds its true Dice (never used by the
features), the features of the method's prediction against the frozen source model's perturbed
references (grata.quality), and the method's own per-step diagnostics. bench/quality_table.py
turns the rows into the Spearman table. Labels are read here only to score.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from grata.adapters import build_adapter
from grata.data import fundus_split
from grata.geometry import ensure_reference
from grata.metrics import score
from grata.models import load_checkpoint
from grata.quality import calibration_rows
from grata.synthetic import SyntheticDomain

TARGETS = {"fundus": (("RIM_ONE_r1", "all"), ("RIM_ONE_r3", "all"), ("Drishti_GS", "all"), ("RIM_ONE_r2", "test")),
           "synthetic": tuple((s, "test") for s in ("clean", "colour_cast", "gamma", "low_contrast", "blur", "noise",
                                                     "uneven_light", "large_disc"))}
SOURCE = {"fundus": "RIM_ONE_r2", "synthetic": "clean"}


def open_split(kind: str, root: str, domain: str, split: str, size: int, n: int = 48):
    return fundus_split(root, domain, split, size) if kind == "fundus" else SyntheticDomain(domain, n, size, split)


def method_options(name: str) -> tuple[str, dict]:
    cfg = yaml.safe_load(Path(f"conf/method/{name}.yaml").read_text())
    return cfg["adapter"], cfg.get("options", {})


def _stack(ds) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([ds[i].image for i in range(len(ds))]), torch.stack([ds[i].mask for i in range(len(ds))])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", choices=sorted(TARGETS), default="fundus")
    ap.add_argument("--root", default="../shared/data/fundus")
    ap.add_argument("--out", default="bench/results/quality_rows.jsonl")
    ap.add_argument("--methods", nargs="+", default=["source", "fedgrata"])
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--calibration", type=int, default=0, help="source train images for the fit's rows")
    ap.add_argument("--copies", type=int, default=3)
    args = ap.parse_args()
    model, meta = load_checkpoint(args.checkpoint)
    source = build_adapter("source", model)
    train = lambda: _stack(open_split(args.data, args.root, SOURCE[args.data], "train", args.size))  # noqa: E731
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as fh:
        if args.calibration:  # the source's own training images under simulated shifts (the fit's data)
            ds = open_split(args.data, args.root, SOURCE[args.data], "train", args.size, args.calibration)
            n = min(len(ds), args.calibration)
            images = torch.stack([ds[i].image for i in range(n)])
            masks = torch.stack([ds[i].mask for i in range(n)])
            t0 = time.perf_counter()
            for row in calibration_rows(source.forward, images, masks, copies=args.copies):
                fh.write(json.dumps({"method": "source", "target": "calibration", **row}) + "\n")
            print(f"calibration {n} images x {args.copies + 1} {time.perf_counter() - t0:6.0f}s", flush=True)
        for method in args.methods:
            kind, options = method_options(method)
            geo = ensure_reference(meta, train) if options.get("geometry", "off") != "off" else None
            adapter = build_adapter(kind, model, shift_reference=meta.get("shift_reference"), quality=meta["quality"],
                                    geometry_reference=geo, **options)
            for target, split in TARGETS[args.data]:
                adapter.reset()
                ds = open_split(args.data, args.root, target, split, args.size)
                n = min(len(ds), args.limit) if args.limit else len(ds)
                t0 = time.perf_counter()
                for i in range(n):
                    s = ds[i]
                    x = s.image[None]
                    logits = adapter.adapt_and_predict(x)
                    returned = "source" if adapter.last_step["fallback"] else "adapted"  # what the method answered
                    row = {"method": method, "target": target, "image": s.name,
                           **{k: float(v[0]) for k, v in score(logits, s.mask[None], with_asd=False).items()},
                           **adapter.monitor.last_features[returned][0],
                           **{f"{k}_{name}": float(v[0]) for name, lg in zip(("adapted", "source"), adapter.last_candidates)
                              for k, v in score(lg, s.mask[None], with_asd=False).items() if k == "dice_mean"},
                           "quality": adapter.last_step["quality"], "quality_source": adapter.last_step["quality_source"],
                           "quality_gain": adapter.last_step["quality_gain"], "fallback": adapter.last_step["fallback"],
                           **{f"step_{k}": v for k, v in adapter.last_step.items()}}
                    fh.write(json.dumps(row) + "\n")
                fh.flush()
                print(f"{method:>10} {target:<12} {n} images {time.perf_counter() - t0:6.0f}s", flush=True)


if __name__ == "__main__":
    main()
