"""Adaptation step throughput: every method, faithful fp32 reference vs the fast path, side by side.

    python -m bench.step [--encoders resnet34 resnet18] [--sizes 256 512] [--methods ...] [--repeats 5]

Each (method, encoder, size, speed) runs in its own process, one after another, so that its peak
memory is its own and no run shares the CPU with another. Batch 1, as at a site. Methods are the
conf/method presets; the model is a seeded random ResUNet (a step's cost does not depend on what
the weights learned), fed synthetic fundus images of the `gamma` style. fedgrata's `bn: auto` keeps
the source statistics here (the path it takes until a site's shift is detected).
Also times the single passes the step is built from (`passes`) and, with --compile, torch.compile.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from bench.common import peak_rss_mib, publish, rss_mib, spread, table, timed

METHODS = ("source", "source_views", "bn", "tent", "sar", "grata_paper", "fedgrata", "fedgrata_fallback",
           "source_geometry", "bn_geometry", "fedgrata_nogeometry")
CONF = Path(__file__).resolve().parent.parent / "conf" / "method"


def method_options(name: str) -> tuple[str, dict]:
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))
    return cfg["adapter"], dict(cfg.get("options") or {})


def _sync(device: str):
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def _peak(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mib()


def run_step(job: dict) -> dict:
    """Time `repeats` adaptation steps after `warmup` ones, one new image each."""
    from grata.adapters import build_adapter
    from grata.models import build_model
    from grata.synthetic import SyntheticDomain

    torch.manual_seed(0)
    adapter_name, options = method_options(job["method"])
    model = build_model(job["encoder"])
    from grata.quality import QualityModel

    if options.get("geometry", "off") != "off":  # the disc detector's calibration, from labelled synthetic images
        from grata.geometry import geometry_reference

        train = [SyntheticDomain("clean", n=8, size=job["size"], split="train")[i] for i in range(8)]
        options = {**options, "geometry_reference": geometry_reference(torch.stack([s.image for s in train]),
                                                                         torch.stack([s.mask for s in train]))}
    adapter = build_adapter(adapter_name, model, shift_reference=1e9, quality=QualityModel.constant().to_dict(),
                            speed=job["speed"], device=job["device"], **options)
    images = SyntheticDomain("gamma", n=job["warmup"] + job["repeats"], size=job["size"])
    batch = [images[i].image[None] for i in range(len(images))]
    before = torch.cuda.memory_allocated() / 2**20 if job["device"] == "cuda" else rss_mib()
    for x in batch[: job["warmup"]]:
        adapter.adapt_and_predict(x)
    times = [timed(lambda x=x: adapter.adapt_and_predict(x), _sync(job["device"])) for x in batch[job["warmup"]:]]
    peak = _peak(job["device"])
    s = spread(times)
    return {**job, "plan": adapter.plan.describe(), "s_per_image": s, "images_per_s": 1 / s["median"],
            "peak_mib": peak, "step_extra_mib": max(0.0, peak - before)}


def run_passes(job: dict) -> dict:
    """One forward (no gradient) and one forward+backward to the BN affine gradients, per precision/layout."""
    from grata.models import build_model
    from grata.norm import StatsPolicy, convert_norms, norm_layers

    torch.manual_seed(0)
    model = convert_norms(build_model(job["encoder"]), StatsPolicy.named("image")).eval().to(job["device"])
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for layer in norm_layers(model) for p in (layer.weight, layer.bias)]
    for p in params:
        p.requires_grad_(True)
    x = torch.rand(1, 3, job["size"], job["size"], device=job["device"])
    out = {}
    for label, cl, bf16 in (("fp32", False, False), ("fp32_cl", True, False), ("bf16_cl", True, True)):
        m = model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
        xi = x.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)

        def fwd():
            with torch.no_grad(), torch.autocast(job["device"], torch.bfloat16, enabled=bf16):
                m(xi)

        def grad():
            with torch.autocast(job["device"], torch.bfloat16, enabled=bf16):
                y = m(xi).float()
            torch.autograd.grad(y.mean(), params)

        for name, fn in (("forward", fwd), ("forward_backward", grad)):
            fn()
            out[f"{name}_{label}"] = spread([timed(fn, _sync(job["device"])) for _ in range(job["repeats"])])
    if job.get("compile"):
        compiled = torch.compile(model.to(memory_format=torch.channels_last))
        xi = x.contiguous(memory_format=torch.channels_last)

        def cfwd():
            with torch.no_grad(), torch.autocast(job["device"], torch.bfloat16):
                compiled(xi)

        out["compile_s"] = timed(cfwd)
        out["forward_bf16_cl_compiled"] = spread([timed(cfwd, _sync(job["device"])) for _ in range(job["repeats"])])
    return {**job, **out}


def in_child(job: dict) -> dict:
    """Run one job in a fresh interpreter; returns its result."""
    proc = subprocess.run([sys.executable, "-m", "bench.step", "--job", json.dumps(job)], capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"bench job {job} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--encoders", nargs="+", default=["resnet34", "resnet18"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 512])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: one per core)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--compile", action="store_true", help="also time a torch.compile'd forward (minutes)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    if args.job:
        job = json.loads(args.job)
        if job["threads"]:
            torch.set_num_threads(job["threads"])
        result = run_passes(job) if job["kind"] == "passes" else run_step(job)
        print("RESULT " + json.dumps(result), flush=True)
        return result
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    common = {"warmup": args.warmup, "repeats": args.repeats, "threads": args.threads, "device": args.device}
    passes, steps = [], []
    for encoder in args.encoders:
        for size in args.sizes:
            r = in_child({**common, "kind": "passes", "encoder": encoder, "size": size, "compile": args.compile})
            passes.append(r)
            print(f"passes {encoder} {size}px: forward fp32 {r['forward_fp32']['median']:.3f} s, "
                  f"bf16 channels-last {r['forward_bf16_cl']['median']:.3f} s", flush=True)
            for method in args.methods:
                pair = {}
                for speed in ("faithful", "fast"):  # side by side, same run
                    pair[speed] = in_child({**common, "kind": "step", "method": method, "encoder": encoder,
                                            "size": size, "speed": speed})
                row = {"method": method, "encoder": encoder, "size": size,
                       "faithful_ips": pair["faithful"]["images_per_s"], "fast_ips": pair["fast"]["images_per_s"],
                       "speedup": pair["fast"]["images_per_s"] / pair["faithful"]["images_per_s"],
                       "faithful_s": pair["faithful"]["s_per_image"]["median"], "fast_s": pair["fast"]["s_per_image"]["median"],
                       "fast_iqr": pair["fast"]["s_per_image"]["q3"] - pair["fast"]["s_per_image"]["q1"],
                       "faithful_mib": pair["faithful"]["peak_mib"], "fast_mib": pair["fast"]["peak_mib"],
                       "runs": pair}
                steps.append(row)
                print(f"  {method:<12} faithful {row['faithful_s']:.3f} s/img  fast {row['fast_s']:.3f} s/img  "
                      f"x{row['speedup']:.2f}", flush=True)
    publish("step", args, step_table(steps) + "\n\n" + passes_table(passes), steps=steps, passes=passes)
    return {"steps": steps, "passes": passes}


def step_table(steps: list[dict]) -> str:
    return table(steps, [("method", "method", ""), ("encoder", "encoder", ""), ("size", "px", "d"),
                         ("faithful_ips", "fp32 faithful img/s", ".2f"), ("fast_ips", "fast img/s", ".2f"),
                         ("speedup", "speed-up", ".2f"), ("fast_iqr", "fast IQR s", ".3f"),
                         ("faithful_mib", "faithful peak MiB", ".0f"), ("fast_mib", "fast peak MiB", ".0f")])


def passes_table(passes: list[dict]) -> str:
    rows = [{"encoder": p["encoder"], "size": p["size"],
             **{k: p[k]["median"] for k in p if k.startswith(("forward_", "forward_backward_")) and isinstance(p[k], dict)},
             "compile_s": p.get("compile_s")} for p in passes]
    cols = [("encoder", "encoder", ""), ("size", "px", "d")]
    for kind, label in (("forward", "fwd"), ("forward_backward", "fwd+bwd")):
        for v in ("fp32", "fp32_cl", "bf16_cl"):
            cols.append((f"{kind}_{v}", f"{label} {v.replace('_cl', ' CL')} s", ".3f"))
    if any(r["compile_s"] for r in rows):
        cols += [("forward_bf16_cl_compiled", "fwd bf16 CL compiled s", ".3f"), ("compile_s", "compile s", ".0f")]
    return table(rows, cols)


if __name__ == "__main__":
    main()
