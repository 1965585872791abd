"""Dice with and without the geometry step on the real targets, their wider-field variants and the
synthetic wide_field style.

    python -m bench.geometry_dice [--methods source source_geometry] [--scales 1 0.6 0.4] [--limit 0]
                                  [--checkpoint PATH] [--root ../shared/data/fundus]
                                  [--variants '{"bn_mixed90": {"adapter": "bn", "options": {...}}}']

The paper's protocol (simulations.evaluate): source RIM_ONE_r2, ResUNet-34, 256 px, targets
RIM_ONE_r1, RIM_ONE_r3, Drishti_GS, all their images, online, reset per target. Each field scale
< 1 shows every target image that much smaller in a wider circular field (data.field_scale,
grata/widefield.py); the synthetic wide_field style (64 images) is scored with the same model.
Writes bench/results/geometry_dice.json (per target: Dice, images, share of images cropped and
retried, the estimated disc scale) and prints the table docs/geometry.md carries.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path

import numpy as np

from bench.common import publish, source_geometry, table


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=["source", "source_geometry"])
    parser.add_argument("--targets", nargs="+", default=[], help="a subset of the real targets (default: all three)")
    parser.add_argument("--scales", nargs="*", type=float, default=[1.0, 0.6, 0.4])
    parser.add_argument("--limit", type=int, default=0)
    parser.add_argument("--split", default="all", choices=["all", "test", "train"], help="the targets' split")
    parser.add_argument("--synthetic", type=int, default=64, help="wide_field images (0: skip)")
    parser.add_argument("--checkpoint", default="")
    parser.add_argument("--synthetic-checkpoint", default="checkpoints/source_synthetic_clean_resnet18_128.pt",
                        help="the synthetic demo's source model (trained on the clean style), for wide_field")
    parser.add_argument("--name", default="geometry_dice", help="bench/results/<name>.json")
    parser.add_argument("--root", default="../shared/data/fundus")
    parser.add_argument("--quality", action="store_true", help="with the checkpoint's quality model (estimate, fallback)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--variants", default="{}",
                        help="JSON: method name -> {adapter, options}, run after --methods (a preset's variants)")
    args = parser.parse_args(argv)

    import simulations.evaluate as ev  # registers the evaluate schema
    from grata.config import DataConfig, MethodConfig
    from grata.models import load_checkpoint
    from grata.train_source import default_checkpoint, load_split
    from server.config import load_config

    overrides = ["data=fundus", f"data.root={args.root}", f"data.target_split={args.split}"]
    if args.targets:
        overrides.append(f"data.targets=[{','.join(args.targets)}]")
    cfg = load_config(overrides, config_name="evaluate")
    variants = json.loads(args.variants)
    for name, spec in variants.items():
        if not isinstance(spec, dict) or set(spec) - {"adapter", "options"} or "adapter" not in spec:
            raise SystemExit(f"--variants {name!r}: needs {{\"adapter\": ..., \"options\": {{...}}}}, got {spec!r}")
        cfg.methods[name] = MethodConfig(adapter=spec["adapter"], options=dict(spec.get("options", {})))
    args.methods = [*args.methods, *variants]
    checkpoint = Path(args.checkpoint or cfg.checkpoint or default_checkpoint(cfg))
    if not Path(cfg.data.root).is_dir() or not checkpoint.is_file():
        raise SystemExit(f"needs the fundus data ({cfg.data.root}) and the source model ({checkpoint})")
    model, meta = load_checkpoint(checkpoint, expect=cfg.model)
    geo = source_geometry(checkpoint, meta, lambda: load_split(cfg.data, "train", None), args.out)
    print("source geometry:", geo, flush=True)
    conditions = [(f"x{s:g}", DataConfig(**{**vars(cfg.data), "field_scale": s}), model, meta, geo) for s in args.scales]
    if args.synthetic:  # the synthetic demo's own source model and its own source geometry
        syn_model, syn_meta = load_checkpoint(args.synthetic_checkpoint)
        sidecar = Path(args.synthetic_checkpoint).with_suffix(".json")
        size = json.loads(sidecar.read_text())["data"]["size"] if sidecar.is_file() else 128
        syn = DataConfig(kind="synthetic", source="clean", targets=["wide_field"], size=size,
                         synthetic_train=80, synthetic_test=args.synthetic, target_split="test")
        syn_geo = source_geometry(Path(args.synthetic_checkpoint), syn_meta, lambda: load_split(syn, "train", None), args.out)
        print("synthetic source geometry:", syn_geo, flush=True)
        conditions.append(("synthetic", syn, syn_model, syn_meta, syn_geo))
    rows, per_image = [], []
    for label, data, model, meta, geo in conditions:
        for method in args.methods:
            with contextlib.redirect_stderr(io.StringIO()):  # progress bars
                summary, records = ev.evaluate_method(method, cfg.methods[method], model, data, None, args.limit,
                                                      cfg.seed, shift_reference=meta.get("shift_reference"),
                                                      quality=meta.get("quality") if args.quality else None,
                                                      geometry_reference=geo)
            for target in data.targets:
                recs = [r for r in records if r["target"] == target]
                row = {"field": label, "target": target, "method": method, **{k: summary[target][k] for k in
                       ("dice_mean", "dice_disc", "dice_cup", "images", "seconds_per_image")}}
                for key in ("geo_cropped", "geo_retried", "geo_share_ratio", "geo_zoom"):
                    if recs and key in recs[0]:
                        row[key] = float(np.mean([r[key] for r in recs]))
                rows.append(row)
                print(f"{label:>9} {target:<11} {method:<18} {row['dice_mean']:6.2f} "
                      f"({row['dice_disc']:5.1f}/{row['dice_cup']:5.1f}) cropped {row.get('geo_cropped', 0):.2f} "
                      f"retried {row.get('geo_retried', 0):.2f}", flush=True)
            per_image += [{"field": label, **{k: r[k] for k in r if k in ("target", "method", "image", "dice_mean",
                          "dice_disc", "dice_cup") or k.startswith("geo_")}} for r in records]
    md = table(rows, [("field", "field", ""), ("target", "target", ""), ("method", "method", ""),
                      ("images", "images", "d"), ("dice_mean", "Dice mean", ".2f"), ("dice_disc", "disc", ".1f"),
                      ("dice_cup", "cup", ".1f"), ("geo_cropped", "cropped", ".2f"), ("geo_retried", "retried", ".2f"),
                      ("geo_zoom", "mean zoom", ".2f"), ("seconds_per_image", "s/img", ".3f")])
    result = {"rows": rows, "per_image": per_image, "geometry_reference": geo, "checkpoint": str(checkpoint)}
    publish(args.name, args, md, **result)
    return result


if __name__ == "__main__":
    main()
