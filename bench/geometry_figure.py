"""The overlay figure of docs/geometry.md and the README: the crops the geometry step chooses, on
synthetic images only (the real fundus data may not be published).

    python -m bench.geometry_figure [--checkpoint checkpoints/source_synthetic_clean_resnet18_128.pt]
                                    [--n 4] [--out docs/img/geometry_crops.png]

The synthetic demo's source model (ResUNet-18 trained on the clean style at 128 px) places the crops,
as at a site: its geometry reference comes from the checkpoint (or its clean training split). Rows:
synthetic wide_field images; clean (disc-centred) images shrunk into a wider field at scale 0.4; the
same at 0.6. Green: the true disc outline (drawn for the reader; the step never sees it); yellow: the
classical detector's disc; magenta: the rim's circle (`rim_centre`, where a wider-field crop starts);
dashed cyan: the detector's crop; solid cyan: the crop segmented after the refinements on the model's
own disc (the title says which path was taken and the zoom).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Circle, Rectangle  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="checkpoints/source_synthetic_clean_resnet18_128.pt")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("docs/img/geometry_crops.png"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from grata.adapters import build_adapter
    from grata.config import DataConfig
    from grata.geometry import GeometryStep, disc_centre, rim_centre
    from grata.metrics import boundary
    from grata.models import load_checkpoint
    from grata.synthetic import SyntheticDomain
    from grata.train_source import load_split
    from grata.widefield import widen

    from bench.common import source_geometry

    model, meta = load_checkpoint(args.checkpoint)
    sidecar = Path(args.checkpoint).with_suffix(".json")
    size = json.loads(sidecar.read_text())["data"]["size"] if sidecar.is_file() else 128
    ref = source_geometry(Path(args.checkpoint), meta,
                          lambda: load_split(DataConfig(kind="synthetic", size=size, synthetic_train=80), "train", None))
    adapter = build_adapter("source", model)
    step = GeometryStep(ref)
    wide = SyntheticDomain("wide_field", n=args.n, size=size, split="figure")
    clean = SyntheticDomain("clean", n=args.n, size=size, split="figure")
    rows = [("wide_field", [(s.image, s.mask) for s in wide]),
            ("clean at x0.4", [widen(s.image, s.mask, 0.4, s.name) for s in clean]),
            ("clean at x0.6", [widen(s.image, s.mask, 0.6, s.name) for s in clean])]
    fig, axes = plt.subplots(len(rows), args.n, figsize=(2.4 * args.n, 2.5 * len(rows)))
    for r, (label, row) in enumerate(rows):
        for c, (image, mask) in enumerate(row):
            ax = axes[r][c]
            ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
            ys, xs = boundary(mask[0].bool()).numpy().nonzero()
            ax.scatter(xs, ys, s=0.3, c="lime")
            box, est, info = step.plan(image[None], adapter._probe)
            first = step.choose_box(est, size)
            ax.add_patch(Circle((est.cx * size, est.cy * size), est.radius * size, fill=False, ec="yellow", lw=1))
            if info["geo_wide"]:
                ry, rx, rr = rim_centre(image, est, disc_centre(image, est))
                ax.add_patch(Circle((rx * size, ry * size), rr * size, fill=False, ec="magenta", lw=1))
            ax.add_patch(Rectangle((first.x0, first.y0), first.side, first.side, fill=False, ec="cyan", lw=1, ls="--"))
            ax.add_patch(Rectangle((box.x0, box.y0), box.side, box.side, fill=False, ec="cyan", lw=1.8))
            path = "wide" if info["geo_wide"] else "model"
            ax.set_title(f"{label}: {path} path, zoom {size / box.side:.1f}", fontsize=7)
            ax.set_axis_off()
    fig.suptitle("geometry step, synthetic images: true disc (green), detector (yellow), rim (magenta), "
                 "detector's crop (dashed), segmented crop (cyan)", fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(f"-> {args.out}")
    return args.out


if __name__ == "__main__":
    main()
