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
from grata.adapters.base import stem_shifts
from grata.models import load_checkpoint


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
    cfg = DataConfig(kind=args.data, root=args.root, size=args.size, source=args.domains[0])
    for domain in args.domains:
        ds = open_domain(cfg, domain, "all")
        picks = np.linspace(0, len(ds) - 1, min(args.n, len(ds))).astype(int)
        shifts = stem_shifts(model, torch.stack([ds[int(i)].image for i in picks]))
        ratio = f"{np.mean(shifts) / ref:8.2f}" if ref else "   (no reference in checkpoint)"
        print(f"{domain:16s} shift {np.mean(shifts):7.3f}  ratio to source {ratio}")


if __name__ == "__main__":
    main()
