"""Per-image study of crop strategies for the geometry step (source model, no adaptation).

    python -m bench.geometry_probe [--scales 1 0.6 0.4] [--every 2] [--checkpoint PATH] [--root DIR]

For every `every`-th image of each real target (all splits), at each field scale, records the Dice
(original frame) of the source model on: the whole image; the detector's crop; one and two
refinements re-centred and re-sized on the model's own predicted disc in the previous crop; the
probe of issue 13 (a crop around the whole image's predicted disc); and the crop placed by the
true disc (an oracle, the ceiling only). Each pass also records label-free facts of its prediction
(disc share in the crop against the source's, whether the disc touches the crop's edge, the box).
Labels score the passes only; no choice here reads them. Writes bench/results/geometry_probe.json,
which the strategy comparison in docs/geometry.md reads.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", nargs="+", type=float, default=[1.0, 0.6, 0.4])
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--targets", nargs="+", default=["RIM_ONE_r1", "RIM_ONE_r3", "Drishti_GS"])
    parser.add_argument("--checkpoint", default="checkpoints/source_fundus_RIM_ONE_r2_resnet34_256.pt")
    parser.add_argument("--root", default="../shared/data/fundus")
    parser.add_argument("--out", type=Path, default=Path("bench/results/geometry_probe.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from grata.adapters import build_adapter
    from grata.config import DataConfig, open_domain
    from grata.geometry import Box, crop, estimate_disc, paste, _minmax
    from grata.metrics import score
    from grata.models import load_checkpoint
    from grata.train_source import load_split

    from bench.common import source_geometry

    model, meta = load_checkpoint(args.checkpoint)
    base = DataConfig(kind="fundus", root=args.root, size=256, source="RIM_ONE_r2", targets=args.targets,
                      target_split="all")
    ref = source_geometry(Path(args.checkpoint), meta, lambda: load_split(base, "train", None), args.out.parent)
    share_ref = ref["disc_share"]
    adapter = build_adapter("source", model)
    S = 256

    def run(x: torch.Tensor, box: Box) -> torch.Tensor:
        with torch.no_grad():
            if box.is_whole(S, S):
                return adapter.forward(x)
            return paste(adapter.forward(_minmax(crop(x, box, S))), box, (S, S))

    def facts(logits: torch.Tensor, box: Box, mask: torch.Tensor) -> dict:
        """Dice (labels) and the label-free facts of the prediction inside `box`."""
        d = {k: float(v[0]) for k, v in score(logits, mask[None], with_asd=False).items()}
        inner = crop(logits, box, S) if not box.is_whole(S, S) else logits
        disc = torch.sigmoid(inner[0, 0]) > 0.5
        share = disc.float().mean().item()
        edge = torch.cat([disc[0], disc[-1], disc[:, 0], disc[:, -1]]).float().mean().item()
        d.update(box=[box.y0, box.x0, box.side], share_ratio=share / share_ref, edge=edge)
        if share > 0:
            ys, xs = torch.nonzero(disc, as_tuple=True)
            sc = box.side / S
            d["pcy"] = (box.y0 + (ys.float().mean().item() + 0.5) * sc) / S
            d["pcx"] = (box.x0 + (xs.float().mean().item() + 0.5) * sc) / S
            d["pshare"] = share * (box.side / S) ** 2  # the predicted disc's share of the original frame
        return d

    def box_at(cy: float, cx: float, share: float) -> Box:
        side = math.sqrt(share / share_ref) * S
        side = int(round(min(max(side, 0.12 * S), S)))
        if side >= S:
            return Box.whole(S, S)
        return Box(int(round(cy * S - side / 2)), int(round(cx * S - side / 2)), side)

    def refine(prev: dict) -> Box | None:
        if "pcy" not in prev:
            return None
        return box_at(prev["pcy"], prev["pcx"], prev["pshare"])

    rows, t0 = [], time.perf_counter()
    for scale in args.scales:
        data = DataConfig(**{**vars(base), "field_scale": scale})
        for target in args.targets:
            ds = open_domain(data, target, "all")
            for i in range(0, len(ds), args.every):
                s = ds[i]
                x, mask = s.image[None], s.mask
                est = estimate_disc(x[0], ref)
                true_share = mask[0].float().mean().item()
                ys, xs = torch.nonzero(mask[0] > 0, as_tuple=True)
                row = {"scale": scale, "target": target, "image": s.name, "true_share_ratio": true_share / share_ref,
                       "true_cy": (ys.float().mean().item() + 0.5) / S, "true_cx": (xs.float().mean().item() + 0.5) / S,
                       "det": {"cy": est.cy, "cx": est.cx, "share_ratio": est.share / share_ref,
                               "contrast": est.contrast, "found": est.found}}
                whole = Box.whole(S, S)
                row["whole"] = facts(run(x, whole), whole, mask)
                b = box_at(est.cy, est.cx, est.share) if est.found else whole
                row["det_crop"] = facts(run(x, b), b, mask)
                for name, prev in (("ref1", "det_crop"), ("ref2", "ref1"), ("probe", "whole"), ("probe2", "probe")):
                    b = refine(row[prev])
                    row[name] = facts(run(x, b), b, mask) if b is not None else row[prev]
                b = box_at(row["true_cy"], row["true_cx"], true_share)
                row["oracle"] = facts(run(x, b), b, mask)
                rows.append(row)
            done = [r for r in rows if r["scale"] == scale and r["target"] == target]
            print(f"x{scale:g} {target:<11} n={len(done)} " + " ".join(
                f"{k} {sum(r[k]['dice_mean'] for r in done) / len(done):.2f}"
                for k in ("whole", "det_crop", "ref1", "ref2", "probe", "probe2", "oracle")),
                f"({time.perf_counter() - t0:.0f} s)", flush=True)
            args.out.write_text(json.dumps({"reference": ref, "rows": rows}))


if __name__ == "__main__":
    main()
