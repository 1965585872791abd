"""What every benchmark shares: the machine record, timing statistics, tables and JSON output."""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from grata.speed import native_bf16

RESULTS = Path("bench/results")


def machine() -> dict[str, Any]:
    """The facts a timing is meaningless without."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    cpu = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")),
               platform.processor())
    info = {"cpu": cpu, "cores": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "bf16_native_cpu": native_bf16(torch.device("cpu")), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return info


def spread(samples: Sequence[float]) -> dict[str, float]:
    """Median and spread of repeated measurements."""
    s = sorted(samples)
    q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0]] * 3
    return {"median": statistics.median(s), "q1": q[0], "q3": q[2], "min": s[0], "max": s[-1], "n": len(s)}


def timed(fn: Callable[[], Any], sync: Callable[[], None] = lambda: None) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def rss_mib() -> float:
    """This process's resident memory now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def table(rows: list[dict[str, Any]], cols: list[tuple[str, str, str]]) -> str:
    """A markdown table; cols are (key, header, format) with format '' for text."""
    head = "| " + " | ".join(h for _, h, _ in cols) + " |"
    rule = "|" + "|".join("---" if not f else "---:" for _, _, f in cols) + "|"
    body = ["| " + " | ".join(_cell(r.get(k), f) for k, _, f in cols) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    return format(value, fmt) if fmt else str(value)


def source_geometry(checkpoint: Path, meta: dict, load_train: Callable[[], Any], out: Path = RESULTS) -> dict:
    """The checkpoint's source geometry (metadata "geometry"); for a checkpoint without it, the copy kept
    as <out>/geometry_reference_<checkpoint>.json, else computed once from the source's training split
    (`load_train()` -> images, masks) and kept there for the next run. It depends on the source's data,
    not the weights."""
    from grata.geometry import ensure_reference

    cache = out / f"geometry_reference_{Path(checkpoint).stem}.json"
    if not meta.get("geometry") and cache.is_file():
        meta["geometry"] = json.loads(cache.read_text())
    geo = ensure_reference(meta, load_train)
    out.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(geo, indent=1))
    return geo


def pyplot():
    """matplotlib's pyplot on the file-only backend: benches run without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 110) -> None:
    """Lay out, write (creating the folder) and release a figure."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def write(name: str, payload: dict[str, Any], out: Path = RESULTS) -> Path:
    """bench/results/<name>.json with the machine record beside the numbers."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2, default=str))
    return path


def publish(name: str, args: argparse.Namespace, tables: str, **payload: Any) -> Path:
    """Print a part's tables and write them as bench/results/<name>.json with its command-line settings."""
    print("\n" + tables)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    path = write(name, {"config": config, **payload}, args.out)
    print(f"\n-> {path}")
    return path
