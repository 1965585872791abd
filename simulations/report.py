"""Merge evaluation runs into one table: `python -m simulations.report RUN_DIR... --out DIR`.

Runs of the same targets (e.g. methods split across processes) become one table.csv, results.json,
per_image.csv, table.txt and dice.png, exactly as a single `simulations.evaluate` run writes them.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from simulations.evaluate import format_table, write_outputs


def merge(run_dirs: list[Path], out: Path) -> dict:
    results, records, config, targets = {}, [], None, None
    for run in run_dirs:
        path = run / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not an evaluation run (no results.json)")
        stored = json.loads(path.read_text())
        run_targets = stored["config"]["data"]["targets"]
        if targets is not None and run_targets != targets:
            raise ValueError(f"{run} evaluated targets {run_targets}, but {run_dirs[0]} evaluated {targets}")
        targets, config = run_targets, config or stored["config"]
        clash = set(results) & set(stored["results"])
        if clash:
            raise ValueError(f"{run} repeats methods {sorted(clash)}")
        results.update(stored["results"])
        with (run / "per_image.csv").open(newline="") as fh:
            records += list(csv.DictReader(fh))
    config = {**config, "merged_from": [str(r) for r in run_dirs], "run": list(results)}
    write_outputs(out, results, records, targets, config)
    print(format_table(results, targets))
    print(f"written to {out}")
    return results


def markdown_table(results: dict[str, dict], targets: list[str]) -> str:
    """Mean Dice with (disc/cup) per target and the mean, one row per method, as a Markdown table."""
    cols = [*targets, "mean"]
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, res in results.items():
        cells = [f"{res[c]['dice_mean']:.1f} ({res[c]['dice_disc']:.1f}/{res[c]['dice_cup']:.1f})" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    args = parser.parse_args()
    results = merge(args.runs, args.out)
    if args.markdown:
        targets = json.loads((args.out / "results.json").read_text())["config"]["data"]["targets"]
        print(markdown_table(results, targets))


if __name__ == "__main__":
    main()
