"""Dump, per image, every label-free quality candidate and the true Dice, for offline study.

    python -m bench.quality_dump --checkpoint <ckpt> --method fedgrata --target Drishti_GS
    python -m bench.quality_dump --checkpoint <ckpt> --calibration 80 --copies 3

One command = one (method, target) stream in the paper's protocol (online, reset at the target's
start), or the source's own training images under simulated acquisition *and geometry* shifts
(`--calibration`: wider fields, off-centre discs, through the geometry step) for refits. Each row:
the true Dice (labels read only to score), the crop-level features the quality model reads
(grata.quality.features; `src_` prefix: the source model's prediction on the same crop), the
frame-level consistency of the disc with the crop and the frame (grata.quality.frame_features), the
ensemble features recomputed on the whole frame (`frame_` prefix) and the adapter's own step record
(`step_`). JSON under bench/results/quality_dump_<method>_<target>.json (the committed ones are gzipped);
bench.quality_candidates scores and refits them in seconds.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from bench.quality_study import SOURCE, _stack, method_options, open_split
from grata.adapters import build_adapter
from grata.geometry import ensure_reference, estimate_disc
from grata.metrics import score
from grata.models import load_checkpoint
from grata.quality import features, frame_features, simulate_shift, source_references
from grata.widefield import widen


def image_row(adapter, x: torch.Tensor, mask: torch.Tensor, geo_ref: dict) -> dict:
    """Adapt-and-predict one image [1,3,S,S] and return its row (mask [1,2,S,S] only scores)."""
    logits = adapter.adapt_and_predict(x)
    step = adapter.last_step
    returned = "source" if step.get("fallback") else "adapted"
    mon = adapter.monitor
    crop = mon.last_features
    row = {**{k: float(v[0]) for k, v in score(logits, mask, with_asd=False).items()},
           **crop[returned][0], **{f"src_{k}": v for k, v in crop["source"][0].items()},
           **{f"dice_mean_{n}": float(score(lg[None], mask, with_asd=False)["dice_mean"][0])
              for n, lg in zip(("adapted", "source"), (c[0] for c in adapter.last_candidates))},
           **{f"step_{k}": float(v) for k, v in step.items()}}
    box = adapter.geometry.boxes[0][0] if adapter.geometry is not None else None
    probs = torch.sigmoid(logits[0].float())
    with torch.no_grad():
        probe = torch.sigmoid(mon.source_logits(x)[0].float())
        refs = [r[0] for r in source_references(mon.source_logits, x)]
    est = estimate_disc(x[0], geo_ref)
    det = (est.cy, est.cx, est.radius) if est.found else None
    where = None if box is None else (box.y0, box.x0, box.side)
    row.update(frame_features(probs[0], where, probe[0], det))
    # the source model's answer on the same crop, for an offline fallback on an estimate that reads the frame
    src = torch.sigmoid(adapter.last_candidates[1][0].float())
    row.update({f"src_{k}": v for k, v in frame_features(src[0], where, probe[0], det).items()})
    row.update({f"src_frame_{k}": v for k, v in features(src, refs).items() if k.endswith(("_expected", "_agreement"))})
    row.update({f"frame_{k}": v for k, v in features(probs, refs).items() if k.endswith(("_expected", "_agreement"))})
    row.update(geo_det_share=est.share, geo_det_contrast=est.contrast, geo_det_found=float(est.found),
               geo_ref_share=geo_ref["disc_share"])
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data", choices=sorted(SOURCE), default="fundus")
    ap.add_argument("--root", default="../shared/data/fundus")
    ap.add_argument("--method", default="fedgrata")
    ap.add_argument("--target", default="Drishti_GS")
    ap.add_argument("--split", default="all")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--calibration", type=int, default=0, help="source train images (geometry-shifted rows)")
    ap.add_argument("--copies", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--part", type=int, nargs=2, default=(0, 1), metavar=("K", "PARTS"),
                    help="calibration: the K-th of PARTS interleaved shares of the images (one command each)")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    model, meta = load_checkpoint(args.checkpoint)
    geo_ref = ensure_reference(meta, lambda: _stack(open_split(args.data, args.root, SOURCE[args.data], "train", args.size)))
    rows, t0 = [], time.perf_counter()
    if args.calibration:
        # the source model through the geometry step, on its own images under acquisition and crop shifts
        adapter = build_adapter("source", model, quality=meta["quality"], geometry="auto", geometry_reference=geo_ref)
        ds = open_split(args.data, args.root, SOURCE[args.data], "train", args.size, args.calibration)
        idx = torch.linspace(0, len(ds) - 1, min(args.calibration, len(ds))).round().long().tolist()
        k, parts = args.part
        g = torch.Generator().manual_seed(args.seed + k)
        for i in idx[k::parts]:
            s = ds[i]
            for c in range(args.copies + 1):
                x, y = s.image[None], s.mask[None]
                if c:
                    x, y = simulate_shift(x, y, g)
                    if torch.rand(1, generator=g).item() < 0.5:  # a wider field, disc smaller and off-centre
                        scale = math.exp(math.log(0.35) + (math.log(0.9) - math.log(0.35)) * torch.rand(1, generator=g).item())
                        xw, yw = widen(x[0], y[0], scale, f"{s.name}_{c}")
                        x, y = xw[None], yw[None]
                adapter.reset()
                rows.append({"method": "source_geometry", "target": "calibration", "image": f"{s.name}_{c}",
                             **image_row(adapter, x, y, geo_ref)})
        name = f"calibration_{args.data}" + (f"_{k}of{parts}" if parts > 1 else "")
    else:
        kind, options = method_options(args.method)
        geo = geo_ref if options.get("geometry", "off") != "off" else None
        adapter = build_adapter(kind, model, shift_reference=meta.get("shift_reference"), quality=meta["quality"],
                                geometry_reference=geo, **options)
        ds = open_split(args.data, args.root, args.target, args.split, args.size)
        n = min(len(ds), args.limit) if args.limit else len(ds)
        for i in range(n):
            s = ds[i]
            rows.append({"method": args.method, "target": args.target, "image": s.name,
                         **image_row(adapter, s.image[None], s.mask[None], geo_ref)})
        name = f"{args.method}_{args.target}"
    out = Path(args.out or f"bench/results/quality_dump_{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows))
    print(f"{name}: {len(rows)} rows {time.perf_counter() - t0:.0f}s -> {out}", flush=True)


if __name__ == "__main__":
    main()
