"""Could an anatomical shape prior veto `bn=auto`'s switch where the switch hurts? From the per-image dumps
of bench.quality_dump (both candidates per image: the adapted prediction and the source model's), no model runs.

    python -m bench.switch_shape [--dumps bench/results/quality_synthetic] [--warmup 4] [--name switch_shape]

The rule studied: when a site's shift says "switch to image statistics", switch only if the adapted
predictions look at least as much like an optic disc and cup as the source-statistics predictions (the
0-100 shape score of grata.quality.shape_score: ellipse fit, solidity, one component, cup inside the disc, a
cup-to-disc ratio in range). The dumps hold image-statistics predictions only after the switch, so the
rule is read on those images (`warmup` of them: what the rule would see at the decision; and all of
them), against the source model's prediction of the same images. Per style: true Dice of both
candidates over the switched images, their shape scores, and whether the rule's verdict matches the
one the labels give (styles that never switch: n/a). Labels only score the verdict.
"""
from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np

from bench.common import publish, table
from grata.quality import shape_score


def shape(r: dict, prefix: str = "") -> float:
    """The shape score of one dump row's adapted (prefix "") or source ("src_") prediction."""
    return shape_score({k[len(prefix):]: v for k, v in r.items() if k.startswith(prefix)})


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dumps", type=Path, default=Path("bench/results/quality_synthetic"))
    ap.add_argument("--method", default="fedgrata")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--name", default="switch_shape")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args(argv)
    paths = sorted(args.dumps.glob(f"{args.method}_*.json.gz"))
    if not paths:
        raise SystemExit(f"no {args.method}_*.json.gz dumps in {args.dumps} (bench.quality_dump writes them)")
    rows = []
    for path in paths:
        recs = json.loads(gzip.decompress(path.read_bytes()))
        row = {"style": path.name[len(args.method) + 1: -len(".json.gz")], "images": len(recs),
               "switched": float(np.mean([r["step_bn_image"] for r in recs]))}
        after = [r for r in recs if r["step_bn_image"] > 0]  # predicted with image statistics
        if not after:
            rows.append({**row, "rule": "n/a", "labels": "n/a", "right": None})
            print(f"{row['style']:<13} never switched", flush=True)
            continue
        first = after[: args.warmup]
        row.update(dice_adapted=float(np.mean([r["dice_mean_adapted"] for r in after])),
                   dice_source=float(np.mean([r["dice_mean_source"] for r in after])),
                   shape_adapted_first=float(np.mean([shape(r) for r in first])),
                   shape_source_first=float(np.mean([shape(r, "src_") for r in first])),
                   shape_adapted=float(np.mean([shape(r) for r in after])),
                   shape_source=float(np.mean([shape(r, "src_") for r in after])))
        keep = row["shape_adapted_first"] >= row["shape_source_first"]
        row["rule"] = "switch" if keep else "veto"
        row["labels"] = "switch" if row["dice_adapted"] >= row["dice_source"] else "veto"
        row["right"] = row["rule"] == row["labels"]
        rows.append(row)
        print(f"{row['style']:<13} Dice {row['dice_adapted']:5.1f} vs {row['dice_source']:5.1f}  shape (first "
              f"{args.warmup}) {row['shape_adapted_first']:5.1f} vs {row['shape_source_first']:5.1f}  rule "
              f"{row['rule']:<6} labels {row['labels']}", flush=True)
    md = table(rows, [("style", "style", ""), ("images", "images", "d"), ("switched", "share switched", ".2f"),
                      ("dice_adapted", "Dice image stats", ".1f"), ("dice_source", "Dice source", ".1f"),
                      ("shape_adapted_first", f"shape adapted, first {args.warmup}", ".1f"),
                      ("shape_source_first", f"shape source, first {args.warmup}", ".1f"),
                      ("shape_adapted", "shape adapted, all", ".1f"), ("shape_source", "shape source, all", ".1f"),
                      ("rule", "rule", ""), ("labels", "labels say", "")])
    judged = [r for r in rows if r["right"] is not None]
    result = {"rows": rows, "right": sum(r["right"] for r in judged), "judged": len(judged)}
    print(f"rule right on {result['right']} of {result['judged']} styles that switch")
    publish(args.name, args, md, **result)
    return result


if __name__ == "__main__":
    main()
