"""Source training throughput: images/s of grata.train_source's step, fp32 vs bf16 (train.precision).

    python -m bench.train [--encoders resnet34 resnet18] [--size 256] [--batch 8] [--repeats 5]

Times the very step train_source runs (grata.train_source.train_step: forward, Dice + BCE,
backward over all weights, Adam) on a batch of synthetic fundus images, after one warm-up step.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.common import peak_rss_mib, publish, spread, table, timed


def measure(encoder: str, size: int, batch: int, repeats: int, bf16: bool) -> dict:
    from grata.models import build_model
    from grata.synthetic import SyntheticDomain
    from grata.train_source import train_step

    torch.manual_seed(0)
    model = build_model(encoder).train()
    if bf16:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ds = SyntheticDomain("clean", n=batch, size=size, split="train")
    x = torch.stack([ds[i].image for i in range(batch)])
    y = torch.stack([ds[i].mask for i in range(batch)])
    train_step(model, opt, x, y, bf16)
    s = spread([timed(lambda: train_step(model, opt, x, y, bf16)) for _ in range(repeats)])
    return {"encoder": encoder, "size": size, "batch": batch, "precision": "bf16" if bf16 else "fp32",
            "s_per_step": s, "images_per_s": batch / s["median"], "peak_rss_mib": peak_rss_mib()}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoders", nargs="+", default=["resnet34", "resnet18"])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    rows = []
    for encoder in args.encoders:
        fp32 = measure(encoder, args.size, args.batch, args.repeats, bf16=False)
        bf16 = measure(encoder, args.size, args.batch, args.repeats, bf16=True)
        rows.append({"encoder": encoder, "size": args.size, "batch": args.batch, "fp32_ips": fp32["images_per_s"],
                     "bf16_ips": bf16["images_per_s"], "speedup": bf16["images_per_s"] / fp32["images_per_s"],
                     "runs": [fp32, bf16]})
        print(f"{encoder} {args.size}px batch {args.batch}: fp32 {fp32['images_per_s']:.2f} img/s, "
              f"bf16 {bf16['images_per_s']:.2f} img/s", flush=True)
    publish("train", args, train_table(rows), rows=rows)
    return rows


def train_table(rows: list[dict]) -> str:
    return table(rows, [("encoder", "encoder", ""), ("size", "px", "d"), ("batch", "batch", "d"),
                        ("fp32_ips", "fp32 img/s", ".2f"), ("bf16_ips", "bf16 CL img/s", ".2f"), ("speedup", "speed-up", ".2f")])


if __name__ == "__main__":
    main()
