"""Dice of GeometryStep settings side by side, same images, one source model (no adaptation).

    python -m bench.geometry_variants --checkpoint PATH [--scales 1 0.6 0.4] [--every 2]
        [--variants '{"disc": {"centre": "disc"}, "rim": {}, "rim_r0": {"refine": 0}}'] [--name NAME]
    python -m bench.geometry_variants --checkpoint checkpoints/source_synthetic_clean_resnet18_128.pt --synthetic 64

Per field scale and real target (every `every`-th image, online, the paper's protocol otherwise):
the source model without the step (`none`) and with the step under each named GeometryStep option
set, with the model passes the placement took beyond the step's own (`geo_extra_passes`: a probe
the step reuses as its first pass is not counted) and the share of images on the wider-field
path. --synthetic N: the synthetic `wide_field` style instead (N test images, every one), with the
synthetic demo's source model as --checkpoint. Labels score the predictions only. Writes bench/results/<name>.json (per image too).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bench.common import publish, source_geometry, table


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--scales", nargs="+", type=float, default=[1.0, 0.6, 0.4])
    parser.add_argument("--targets", nargs="+", default=["RIM_ONE_r1", "RIM_ONE_r3", "Drishti_GS"])
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--variants", default='{"disc": {"centre": "disc"}, "rim": {}, "rim_r0": {"refine": 0}}',
                        help="name -> GeometryStep options (JSON); `none` (no step) is always run at scale 1")
    parser.add_argument("--synthetic", type=int, default=0, help="wide_field images instead of the real targets")
    parser.add_argument("--root", default="../shared/data/fundus")
    parser.add_argument("--name", default="geometry_variants")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)

    import torch

    from grata.adapters import build_adapter
    from grata.config import DataConfig, open_domain
    from grata.geometry import GeometryStep
    from grata.metrics import score
    from grata.models import load_checkpoint
    from grata.train_source import load_split

    torch.set_num_threads(1)
    model, meta = load_checkpoint(args.checkpoint)
    if args.synthetic:  # the synthetic demo's model and style; its own source geometry
        sidecar = Path(args.checkpoint).with_suffix(".json")
        size = json.loads(sidecar.read_text())["data"]["size"] if sidecar.is_file() else 128
        source = DataConfig(kind="synthetic", source="clean", targets=["wide_field"], size=size,
                            synthetic_train=80, synthetic_test=args.synthetic, target_split="test")
        conditions, args.every = [(1.0, source, "test")], 1
    else:
        source = DataConfig(kind="fundus", root=args.root, size=256, source="RIM_ONE_r2", targets=args.targets,
                            target_split="all")
        conditions = [(s, DataConfig(**{**vars(source), "field_scale": s}), "all") for s in args.scales]
    ref = source_geometry(Path(args.checkpoint), meta, lambda: load_split(source, "train", None), args.out)
    variants = {name: opts for name, opts in json.loads(args.variants).items()}
    rows, per_image = [], []
    for scale, data, split in conditions:
        runs = ({"none": None} if scale == 1 else {}) | variants
        for target in data.targets:
            ds = open_domain(data, target, split)
            for name, opts in runs.items():
                adapter = build_adapter("source", model, geometry="off" if opts is None else "auto",
                                        geometry_reference=ref)
                if opts is not None:
                    adapter.geometry = GeometryStep(ref, **opts)
                dice, extra, wide = [], [], []
                for i in range(0, len(ds), args.every):
                    sample = ds[i]
                    logits = adapter.adapt_and_predict(sample.image[None])
                    dice.append(float(score(logits, sample.mask[None], with_asd=False)["dice_mean"][0]))
                    extra.append(float(adapter.last_step.get("geo_extra_passes", 0.0)))
                    wide.append(float(adapter.last_step.get("geo_wide", 0.0)))
                    per_image.append({"field": f"x{scale:g}", "target": target, "variant": name,
                                      "image": sample.name, "dice_mean": dice[-1], "extra_passes": extra[-1],
                                      "cropped": float(adapter.last_step.get("geo_cropped", 0.0)),
                                      "site_known": float(adapter.last_step.get("geo_site_known", 0.0))})
                row = {"field": f"x{scale:g}", "target": target, "variant": name, "images": len(dice),
                       "dice_mean": float(np.mean(dice)), "extra_passes": float(np.mean(extra)),
                       "wide_share": float(np.mean(wide))}
                rows.append(row)
                print(f"x{scale:g} {target:<11} {name:<10} {row['dice_mean']:6.2f}  extra passes "
                      f"{row['extra_passes']:.2f}  wide {row['wide_share']:.2f}", flush=True)
    md = table(rows, [("field", "field", ""), ("target", "target", ""), ("variant", "variant", ""),
                      ("images", "images", "d"), ("dice_mean", "Dice mean", ".2f"),
                      ("extra_passes", "extra passes", ".2f"), ("wide_share", "wider-field path", ".2f")])
    result = {"rows": rows, "per_image": per_image, "variants": variants, "checkpoint": args.checkpoint}
    publish(args.name, args, md, **result)
    return result


if __name__ == "__main__":
    main()
