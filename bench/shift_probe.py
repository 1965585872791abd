"""How far each domain's low-level statistics sit from the source's: the signal bn="auto" decides on.

    python -m bench.shift_probe CHECKPOINT DOMAIN... [--data fundus|synthetic] [--n 30]

Prints each domain's mean per-image stem-BN shift (symmetric KL to the source running statistics)
and its ratio to the source's own shift stored in the checkpoint.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from grata.config import DataConfig, open_domain
from grata.models import load_checkpoint
from grata.norm import StatsPolicy, convert_norms, norm_layers


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("domains", nargs="+")
    parser.add_argument("--data", default="fundus")
    parser.add_argument("--root", default="../shared/data/fundus")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--n", type=int, default=30)
    args = parser.parse_args()
    model, meta = load_checkpoint(args.checkpoint)
    ref = meta.get("shift_reference")
    model = convert_norms(model, StatsPolicy.named("source")).eval()
    stem = norm_layers(model)[0]
    cfg = DataConfig(kind=args.data, root=args.root, size=args.size, source=args.domains[0])
    for domain in args.domains:
        ds = open_domain(cfg, domain, "all")
        shifts = []
        for i in np.linspace(0, len(ds) - 1, min(args.n, len(ds))).astype(int):
            stem.observe_next = True
            model(ds[int(i)].image[None])
            shifts.append(stem.last_shift)
        ratio = f"{np.mean(shifts) / ref:8.2f}" if ref else "   (no reference in checkpoint)"
        print(f"{domain:16s} shift {np.mean(shifts):7.3f}  ratio to source {ratio}")


if __name__ == "__main__":
    main()
