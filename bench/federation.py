"""Federation overhead: wall time of simulations.run against the sum of the sites' adaptation compute.

    python -m bench.federation [--sites 4 8 16] [--images 8 16] [--variant local_only]

Each point is one `python -m simulations.run` process (Flower simulation engine, Ray, 1 CPU per
site, MLflow in a fresh sqlite file) over synthetic sites: the four demo styles, then
`<style>-<k>` for more hospitals of the same styles with their own images. The demo's model
(ResUNet-18, 128 px, fedgrata, 4 rounds). Reported per point:
  wall        the coordinator's federation time (first query to last round's bookkeeping);
  compute     the sum over sites and rounds of each site's adaptation loop;
  wall/compute (<= 1 means the sites ran side by side); wall - compute/2: what the 2 workers did not
  spend adapting; startup (until every site has answered the first query: in simulation the engine's
  workers start and import torch) and the rounds; bookkeeping (MLflow writes + saved state);
  process     the whole command, with Python, Ray and the simulation engine starting.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import publish, table

STYLES = ("colour_cast", "gamma", "low_contrast", "uneven_light")


def site_names(n: int) -> list[str]:
    return [STYLES[i % 4] if i < 4 else f"{STYLES[i % 4]}-{i // 4}" for i in range(n)]


def one(n_sites: int, images: int, variant: str, rounds: int, work: Path) -> dict:
    run_dir = work / f"{variant}_{n_sites}x{images}"
    overrides = [f"data.sites=[{','.join(site_names(n_sites))}]", f"data.synthetic_test={images}",
                 f"federation={variant}", f"federation.rounds={rounds}", f"out_dir={run_dir}",
                 f"mlflow.tracking_uri=sqlite:///{work / 'mlflow.db'}", "mlflow.experiment=bench-federation",
                 f"hydra.run.dir={work / 'hydra'}"]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "simulations.run", *overrides], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    process_s = time.perf_counter() - t0
    summaries = sorted(run_dir.glob("*/summary.json"))
    if proc.returncode or not summaries:
        raise RuntimeError(f"simulations.run {' '.join(overrides)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    timing = json.loads(summaries[-1].read_text())["timing"]
    workers = min(n_sites, os.cpu_count() or 1)
    return {"sites": n_sites, "images_per_site": images, "images": n_sites * images, "variant": variant,
            "rounds": rounds, "workers": workers, "wall_s": timing["wall_s"], "compute_s": timing["client_compute_s"],
            "wall_over_compute": timing["wall_s"] / timing["client_compute_s"],
            "bookkeeping_s": timing.get("bookkeeping_s"), "process_s": process_s,
            "overhead_s": timing["wall_s"] - timing["client_compute_s"] / workers,
            "startup_s": timing.get("startup_s"), "rounds_s": sum(timing.get("round_s", [])) or None,
            "compute_per_image_s": timing["client_compute_s"] / (n_sites * images)}


def federation_table(rows: list[dict]) -> str:
    return table(rows, [("sites", "sites", "d"), ("images_per_site", "images/site", "d"), ("variant", "variant", ""),
                        ("compute_s", "site compute s", ".1f"), ("wall_s", "federation wall s", ".1f"),
                        ("wall_over_compute", "wall / compute", ".2f"), ("overhead_s", "wall - compute/2 s", ".1f"),
                        ("startup_s", "startup s", ".1f"), ("rounds_s", "rounds s", ".1f"),
                        ("bookkeeping_s", "MLflow + state s", ".2f"), ("process_s", "process s", ".1f")])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", nargs="+", type=int, default=[4, 8, 16])
    parser.add_argument("--images", nargs="+", type=int, default=[8, 16])
    parser.add_argument("--variant", default="local_only", choices=["local_only", "fed_stats", "fed_affine"])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedgrata-bench-") as tmp:
        for images in args.images:
            for n in args.sites:
                row = one(n, images, args.variant, args.rounds, Path(tmp))
                rows.append(row)
                print(f"{n:>2} sites x {images:>2} images: compute {row['compute_s']:.1f} s, wall {row['wall_s']:.1f} s "
                      f"(x{row['wall_over_compute']:.2f}), process {row['process_s']:.1f} s", flush=True)
    publish("federation", args, federation_table(rows), model="ResUNet-18, 128 px, synthetic, fedgrata", rows=rows)
    return rows


if __name__ == "__main__":
    main()
