"""How far label-free disc-centre estimates lie from the true disc centre (no model involved).

    python -m bench.geometry_centre [--scales 0.6 0.4] [--every 2] [--clips 0.15 0.3 0.5 0.7] [--source] [--root DIR]

For every `every`-th image of each real target at each field scale: the classical detector's centre
(`detect_blob`, the brightest compact part of the disc, near the cup), `disc_centre` (the centre
of the whole bright disc at the detector's scale, grata/geometry.py) at each brightness clip, and
`rim_centre` (the rim's circle in the red channel, started at `disc_centre`'s default clip), as the
distance from the mask's centre in true disc radii; for the rim also its radius / the true radius. --source: the source's own training images
(RIM_ONE_r2 train, widened the same way), where the clip is chosen. Labels score the estimates only.
Writes bench/results/geometry_centre.json.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", nargs="+", type=float, default=[0.6, 0.4])
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--targets", nargs="+", default=["RIM_ONE_r1", "RIM_ONE_r3", "Drishti_GS"])
    parser.add_argument("--clips", nargs="+", type=float, default=[0.15, 0.3, 0.5, 0.7])
    parser.add_argument("--source", action="store_true", help="the source's widened training images instead")
    parser.add_argument("--root", default="../shared/data/fundus")
    parser.add_argument("--reference", default="bench/results/geometry_reference_source_fundus_RIM_ONE_r2_resnet34_256.json")
    parser.add_argument("--out", type=Path, default=Path("bench/results/geometry_centre.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from grata.config import DataConfig, open_domain
    from grata.data import Sample
    from grata.geometry import disc_centre, estimate_disc, rim_centre
    from grata.train_source import load_split
    from grata.widefield import WideField

    ref = json.loads(Path(args.reference).read_text())
    base = DataConfig(kind="fundus", root=args.root, size=256, source="RIM_ONE_r2", targets=args.targets,
                      target_split="all")
    rows, summary = [], []
    for scale in args.scales:
        data = DataConfig(**{**vars(base), "field_scale": scale})
        for target in (["RIM_ONE_r2_train"] if args.source else args.targets):
            if args.source:  # the source is never widened by open_domain: widen its training split here
                ims, masks = load_split(base, "train", None)
                ds = WideField([Sample(i, m, f"src{k}") for k, (i, m) in enumerate(zip(ims, masks))], scale)
            else:
                ds = open_domain(data, target, "all")
            offs: dict[str, list[float]] = {"detector": [], **{f"clip {c:g}": [] for c in args.clips}, "rim": []}
            for i in range(0, len(ds), args.every):
                s = ds[i]
                m = s.mask[0] > 0
                ys, xs = torch.nonzero(m, as_tuple=True)
                side = m.shape[-1]
                ty, tx = (ys.float().mean().item() + 0.5) / side, (xs.float().mean().item() + 0.5) / side
                rad = math.sqrt(m.float().mean().item() / math.pi)
                est = estimate_disc(s.image, ref)
                row = {"scale": scale, "target": target, "image": s.name,
                       "detector": math.hypot(est.cy - ty, est.cx - tx) / rad}
                for c in args.clips:
                    cy, cx = disc_centre(s.image, est, clip=c)
                    row[f"clip {c:g}"] = math.hypot(cy - ty, cx - tx) / rad
                cy, cx, r = rim_centre(s.image, est, disc_centre(s.image, est))
                row["rim"], row["rim_radius"] = math.hypot(cy - ty, cx - tx) / rad, r / rad
                rows.append(row)
                for k in offs:
                    offs[k].append(row[k])
            line = {"scale": scale, "target": target, "images": len(offs["detector"])}
            for k, v in offs.items():
                t = torch.tensor(v)
                line[k] = {"median": float(t.median()), "mean": float(t.mean()), "over_0.3": float((t > 0.3).float().mean())}
            summary.append(line)
            print(f"x{scale:g} {target:<11} n={line['images']} " + " ".join(
                f"{k}: med {line[k]['median']:.2f} mean {line[k]['mean']:.2f} >0.3 {line[k]['over_0.3']:.2f}"
                for k in offs), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    return {"summary": summary}


if __name__ == "__main__":
    main()
