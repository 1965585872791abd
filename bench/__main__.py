"""The benchmark suite: `python -m bench` (or `make bench`).

Runs, one after another so that no timing shares the CPU with another:
  step        adaptation step throughput and peak memory, every method, faithful fp32 vs fast (bench/step.py)
  dice        Dice of fast vs faithful on the real fundus targets, when data and checkpoint are here (bench/dice.py)
  train       source training throughput, fp32 vs bf16 (bench/train.py)
  federation  simulation wall time against the sites' compute, 4/8/16 sites x 2 image counts (bench/federation.py)
and, when a CUDA device is at hand, the step table on it. Each part writes bench/results/<part>.json
(machine, torch version, threads, configuration, median and spread); all tables go to
bench/results/tables.md. `--quick` is a minutes-long smoke run of every part on small settings.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench import dice, federation, step, train
from bench.common import machine

PARTS = ("step", "dice", "train", "federation")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--quick", action="store_true", help="small settings: a smoke run of every part")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    out = ["--out", str(args.out)]
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, bf16 native: {info['bf16_native_cpu']}, "
          f"torch {info['torch']}, GPU: {info['cuda'] or 'none'}", flush=True)
    sections, t0 = [], time.perf_counter()
    if "step" in args.parts:
        quick = ["--encoders", "resnet18", "--sizes", "128", "--methods", "tent", "grata_paper", "--repeats", "2", "--warmup", "1"]
        r = step.main((quick if args.quick else []) + out)
        sections += ["## Adaptation step (CPU)", step.step_table(r["steps"]), "", "Single passes:", step.passes_table(r["passes"])]
        if torch.cuda.is_available():
            r = step.main((quick if args.quick else []) + ["--device", "cuda", "--out", str(args.out / "cuda")])
            sections += ["## Adaptation step (GPU)", step.step_table(r["steps"])]
        else:
            sections += ["", "No GPU here: the GPU step table was not made."]
    if "dice" in args.parts:
        try:
            rows = dice.main((["--limit", "2", "--methods", "grata_paper"] if args.quick else []) + out)
            sections += ["## Dice, fast vs faithful (real fundus targets)", dice.dice_table(rows)]
        except SystemExit as exc:  # no data or no checkpoint here: said, not hidden
            print(f"dice: skipped: {exc}")
            sections += ["## Dice, fast vs faithful", f"skipped: {exc}"]
    if "train" in args.parts:
        rows = train.main((["--encoders", "resnet18", "--size", "128", "--repeats", "2"] if args.quick else []) + out)
        sections += ["## Source training", train.train_table(rows)]
    if "federation" in args.parts:
        rows = federation.main((["--sites", "2", "4", "--images", "4"] if args.quick else []) + out)
        sections += ["## Federation", federation.federation_table(rows)]
    for part, title, render in (("dice", "## Dice, fast vs faithful (real fundus targets)", lambda d: dice.dice_table(d["rows"])),
                                ("train", "## Source training", lambda d: train.train_table(d["rows"])),
                                ("federation", "## Federation", lambda d: federation.federation_table(d["rows"]))):
        saved = args.out / f"{part}.json"
        if part not in args.parts and saved.is_file():  # an earlier run's table, said as such
            sections += [f"{title} (from {saved}, an earlier run)", render(json.loads(saved.read_text()))]
    args.out.mkdir(parents=True, exist_ok=True)
    header = (f"Machine: {info['cpu']}, {info['cores']} cores, {info.get('memory_gib', '?')} GiB, "
              f"bf16 native {info['bf16_native_cpu']}, torch {info['torch']}; {time.strftime('%Y-%m-%d')}, "
              f"{time.perf_counter() - t0:.0f} s")
    (args.out / "tables.md").write_text("\n\n".join([header, *sections]) + "\n")
    print(f"\nall tables -> {args.out / 'tables.md'}")


if __name__ == "__main__":
    main()
