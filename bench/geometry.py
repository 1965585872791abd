"""What the geometry step costs per image, against one forward pass of the model at 256 px.

    python -m bench.geometry [--size 256] [--encoder resnet34] [--repeats 30] [--threads 1]
                             [--checkpoint PATH --root DIR --scales 1 0.6 0.4 --per-target 16]

Times, on synthetic wide_field images (the step's work does not depend on the data): the disc
estimate (the classical detector), crop + min-max + map back of the logits, their sum, and one
no-grad forward of ResUNet at the same size through a `source` adapter on the fast path (bf16 where
native, channels-last) and on the fp32 faithful path. Writes bench/results/geometry.json.
The retry (a second adapter step on a corrected crop) is not in this figure: its rate is counted
per target by the Dice runs (`geo_retried` in per_image.csv) and reported in docs/geometry.md.

Per path (with --checkpoint and the fundus data): what the geometry step adds to segmenting an
image, timed per image on `per-target` images of each real target at each field scale: `--method`'s
adapter's adapt-and-predict (source: one forward; fedgrata: about 14 forwards plus the quality
estimate) with geometry=auto (detector, disc centre, every probe pass, the step's own pass, a retry if
any, the state snapshot, map back) less the same adapter's adapt-and-predict without it on the same
image from the same state, in units of one forward timed alongside (the median of
`--repeats-per-image` paired, interleaved rounds per image: one image's time on this shared machine
varies by about half a forward, which unpaired medians did not cancel); grouped by the path the image
took (kept whole / near-scale crop / wider field, and whether the site's known protocol placed it
without the whole-image probe), by target and scale (each a site: reset before its first image), and
over all images. The
probe passes the step did not reuse are counted too (`geo_extra_passes`: a probe whose input the
step segments is the step's own first pass).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.common import publish, spread, table, timed


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpoint", default="checkpoints/source_fundus_RIM_ONE_r2_resnet34_256.pt")
    parser.add_argument("--root", default="../shared/data/fundus")
    parser.add_argument("--scales", nargs="+", type=float, default=[1.0, 0.6, 0.4])
    parser.add_argument("--targets", nargs="+", default=["RIM_ONE_r1", "RIM_ONE_r3", "Drishti_GS"])
    parser.add_argument("--per-target", type=int, default=16)
    parser.add_argument("--repeats-per-image", type=int, default=3, help="paired rounds per image (median)")
    parser.add_argument("--method", default="source", help="conf/method preset timed per path (its geometry on and off)")
    parser.add_argument("--options", default="{}", help="GeometryStep options as JSON, e.g. '{\"refine\": 1}'")
    parser.add_argument("--name", default="geometry", help="bench/results/<name>.json")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from grata.adapters import build_adapter
    from grata.geometry import GeometryStep, crop, estimate_disc, paste, _minmax
    from grata.models import build_model
    from grata.synthetic import SyntheticDomain

    images = [s.image[None] for s in SyntheticDomain("wide_field", n=args.repeats, size=args.size)]
    ref = {"disc_share": 0.43, "detector_gain": 1.0, "min_contrast": 1.0}
    step = GeometryStep(ref)
    boxes = [step.choose_box(estimate_disc(x[0], ref), args.size) for x in images]
    logits = torch.zeros(1, 2, args.size, args.size)
    for x in images[:3]:  # warm-up
        estimate_disc(x[0], ref)

    def locate(x):
        return step.choose_box(estimate_disc(x[0], ref), args.size)

    def crop_and_back(x, box):  # the model's logits on the crop stand in as zeros
        if box.is_whole(args.size, args.size):
            return x
        _minmax(crop(x, box, args.size))
        return paste(logits, box, (args.size, args.size))

    t_locate = [timed(lambda x=x: locate(x)) for x in images]
    t_crop = [timed(lambda x=x, b=b: crop_and_back(x, b)) for x, b in zip(images, boxes)]
    t_total = [a + b for a, b in zip(t_locate, t_crop)]
    model = build_model(args.encoder).eval()
    forward = {}
    for speed in ("fast", "faithful"):
        adapter = build_adapter("source", model, speed=speed)
        with torch.no_grad():
            for x in images[:2]:
                adapter.forward(x)
            forward[speed] = spread([timed(lambda x=x: adapter.forward(x)) for x in images[: max(5, args.repeats // 3)]])
    rows = [
        {"part": "disc estimate (classical detector)", **_ms(spread(t_locate))},
        {"part": "crop + min-max + map back", **_ms(spread(t_crop))},
        {"part": "geometry step total", **_ms(spread(t_total))},
        {"part": f"one forward {args.encoder} {args.size} px, fast", **_ms(forward["fast"])},
        {"part": f"one forward {args.encoder} {args.size} px, fp32 faithful", **_ms(forward["faithful"])},
    ]
    ratio = spread(t_total)["median"] / forward["fast"]["median"]
    md = table(rows, [("part", "part", ""), ("median_ms", "median ms", ".2f"), ("q1_ms", "q1 ms", ".2f"),
                      ("q3_ms", "q3 ms", ".2f")])
    md += f"\n\ngeometry step / one fast forward = {ratio:.3f} (median over {args.repeats} images, {args.threads} threads)"
    result = {"rows": rows, "ratio_to_fast_forward": ratio,
              "cropped_share": sum(not b.is_whole(args.size, args.size) for b in boxes) / len(boxes)}
    paths = _per_path(args, forward["fast"]["median"]) if Path(args.checkpoint).is_file() and Path(args.root).is_dir() else []
    if paths:
        md += "\n\n" + table(paths, [("path", "path / cell", ""), ("images", "images", "d"),
                                     ("probes", "unreused probes / image", ".2f"), ("median_ms", "added ms (median)", ".1f"),
                                     ("forward_ms", "one forward ms", ".1f"), ("extra_forwards", "extra forwards (median)", ".2f"),
                                     ("mean_extra_forwards", "extra forwards (mean)", ".2f")])
    result["paths"] = paths
    publish(args.name, args, md, **result)
    return result


def _per_path(args, _synthetic_forward: float) -> list[dict]:
    """The geometry step's cost per path, with the real source model and `--method`'s adapter (see the
    module docstring): per image, its adapt-and-predict with the step less the same preset's without
    it (`_paired`), in forwards at `size` px. A probe the step reuses as its own first pass is not
    counted twice."""
    import copy
    import json

    from grata.adapters import build_adapter
    from grata.config import DataConfig, open_domain
    from grata.geometry import GeometryStep
    from grata.models import load_checkpoint
    from grata.progress import Progress
    from grata.train_source import load_split

    from bench.common import source_geometry
    from bench.step import method_options

    model, meta = load_checkpoint(args.checkpoint)
    base = DataConfig(kind="fundus", root=args.root, size=args.size, source="RIM_ONE_r2", targets=args.targets,
                      target_split="all")
    ref = source_geometry(Path(args.checkpoint), meta, lambda: load_split(base, "train", None))
    name, options = method_options(args.method)
    common = dict(shift_reference=meta.get("shift_reference"), quality=meta.get("quality"),
                  **{**options, "geometry": "off"})
    adapter = build_adapter(name, model, **{**common, "geometry": "auto"}, geometry_reference=ref)
    adapter.geometry = GeometryStep(ref, **json.loads(args.options))
    plain = build_adapter(name, copy.deepcopy(model), **common)  # the same step without it, on its own copy
    images = []
    for scale in args.scales:
        data = DataConfig(**{**vars(base), "field_scale": scale})
        for target in args.targets:
            ds = open_domain(data, target, "all")
            picked = [ds[i].image[None] for i in range(0, len(ds), max(1, len(ds) // args.per_target))]
            images += [(f"{target} x{scale:g}", x) for x in picked[: args.per_target]]
    for _, x in images[:2]:
        plain.adapt_and_predict(x)
        adapter.adapt_and_predict(x)
    adapter.reset()
    plain.reset()
    groups: dict[str, list[tuple[float, float]]] = {}
    site = None
    bar = Progress(len(images), "geometry cost per image")
    for cell, x in images:
        if cell != site:  # each target at each scale is a site of its own: its votes start afresh
            adapter.reset()
            plain.reset()
            site = cell
        added, fwd = _paired(adapter, plain, x, args.repeats_per_image)
        last = adapter.last_step
        path = "wider field" if last["geo_wide"] else ("near-scale crop" if last["geo_cropped"] else "kept whole")
        if last.get("geo_site_known"):
            path += ", from the site's protocol"
        for key in (path, cell, "all images"):
            groups.setdefault(key, []).append((added / fwd, last["geo_extra_passes"], added, fwd))
        bar.update(extra_forwards=added / fwd)
    bar.close()
    return [{"path": p, "images": len(v), "probes": sum(r[1] for r in v) / len(v),
             "median_ms": spread([r[2] for r in v])["median"] * 1e3,
             "mean_ms": sum(r[2] for r in v) / len(v) * 1e3,
             "forward_ms": spread([r[3] for r in v])["median"] * 1e3,
             "extra_forwards": spread([r[0] for r in v])["median"],
             "mean_extra_forwards": sum(r[0] for r in v) / len(v)} for p, v in groups.items()]


def _paired(adapter, plain, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """What the geometry step adds to one image, and one forward, both in seconds: the median over
    `repeats` rounds of (adapter with the step - the same adapter without it) on this image, each
    round from the same state (so each repeat takes the same path), and the median of one plain
    forward timed in the same rounds. Paired and interleaved, so that the shared machine's drift
    (here one image's time varies by about half a forward) falls on both sides of the difference."""
    state, plain_state = adapter.state_dict(), plain.state_dict()
    added, forwards = [], []
    for r in range(repeats):
        adapter.load_state_dict(state)  # the last round leaves the adapter past this image
        plain.load_state_dict(plain_state)
        with torch.no_grad():
            forwards.append(timed(lambda: plain.forward(x)))
        off = timed(lambda: plain.adapt_and_predict(x))
        on = timed(lambda: adapter.adapt_and_predict(x))
        added.append(on - off)
    return spread(added)["median"], spread(forwards)["median"]


def _ms(s: dict) -> dict:
    return {"median_ms": s["median"] * 1e3, "q1_ms": s["q1"] * 1e3, "q3_ms": s["q3"] * 1e3, "n": s["n"]}


if __name__ == "__main__":
    main()
