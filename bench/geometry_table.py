"""Issue 13's table from the geometry Dice runs: each method with and without the step, on the
unchanged targets and their wider-field variants, with the issue's two criteria checked.

    python -m bench.geometry_table [bench/results/geometry_dice_*.json ...]

Reads the per-target rows `bench.geometry_dice` wrote (one file per run; later files win for the
same field, target and method) and prints markdown: mean Dice per field and target, the step's
change, the share of the unchanged target's Dice recovered on the wider fields (issue 13: >= 90 %),
and the change on the unchanged targets (issue 13: no more than 0.3 below without the step).
The baseline of every ratio is the method WITHOUT the step on the unchanged target.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

TARGETS = ("RIM_ONE_r1", "RIM_ONE_r3", "Drishti_GS")


def load(paths: list[Path]) -> dict[tuple[str, str, str], dict]:
    rows = {}
    for path in paths:
        for r in json.loads(path.read_text())["rows"]:
            rows[(r["field"], r["target"], r["method"])] = r
    return rows


def render(rows: dict[tuple[str, str, str], dict], base: str, with_step: str) -> str:
    fields = sorted({f for f, _, m in rows if m in (base, with_step)}, key=lambda f: (f == "synthetic", -_scale(f)))
    lines = [f"| field | target | images | {base} | {with_step} | change | of the unchanged {base} | cropped |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for field in fields:
        targets = [t for t in (*TARGETS, "wide_field") if (field, t, base) in rows or (field, t, with_step) in rows]
        for t in targets:
            a, b = rows.get((field, t, base)), rows.get((field, t, with_step))
            ref = rows.get(("x1", t, base))
            cells = [field, t, str((a or b)["images"]), _f(a), _f(b)]
            cells.append(f"{b['dice_mean'] - a['dice_mean']:+.2f}" if a and b else "-")
            cells.append(f"{100 * b['dice_mean'] / ref['dice_mean']:.1f} %" if b and ref and field not in ("x1",) else "-")
            cells.append(f"{b.get('geo_cropped', 0):.2f}" if b else "-")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _scale(field: str) -> float:
    try:
        return float(field.lstrip("x"))
    except ValueError:
        return 0.0


def _f(r: dict | None) -> str:
    return "-" if r is None else f"{r['dice_mean']:.2f} ({r['dice_disc']:.1f}/{r['dice_cup']:.1f})"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--pairs", nargs="+", default=["source:source_geometry", "fedgrata:fedgrata_geometry"])
    args = parser.parse_args(argv)
    files = args.files or [p for p in sorted(Path("bench/results").glob("geometry_dice_*.json")) if "sample" not in p.name]
    rows = load(files)
    out = []
    for pair in args.pairs:
        base, with_step = pair.split(":")
        if any(m in (base, with_step) for _, _, m in rows):
            out.append(f"### {base} with and without the geometry step\n\n" + render(rows, base, with_step))
    text = "\n\n".join(out)
    print(text)
    return text


if __name__ == "__main__":
    main()
