"""The overlay figure of docs/geometry.md: the crop the geometry step chooses, on synthetic images only
(the real fundus data may not be published).

    python -m bench.geometry_figure [--disc-share 0.43] [--out docs/geometry_crops.png]

Top row: synthetic wide_field images; bottom row: synthetic clean (disc-centred) images shrunk into a
wider field at scale 0.4 (grata/widefield.py). Green: the true disc outline; yellow: the detector's
disc estimate; cyan: the chosen crop (whole image when none).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Circle, Rectangle  # noqa: E402

from grata.geometry import GeometryStep, estimate_disc  # noqa: E402
from grata.metrics import boundary  # noqa: E402
from grata.synthetic import SyntheticDomain  # noqa: E402
from grata.widefield import widen  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--disc-share", type=float, default=0.43, help="the source's median disc share")
    parser.add_argument("--gain", type=float, default=1.0, help="the detector's calibration (reference detector_gain)")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("docs/geometry_crops.png"))
    args = parser.parse_args(argv)
    ref = {"disc_share": args.disc_share, "detector_gain": args.gain, "min_contrast": 1.0}
    step = GeometryStep(ref)
    wide = SyntheticDomain("wide_field", n=args.n, size=256)
    clean = SyntheticDomain("clean", n=args.n, size=256, split="figure")
    rows = [[(s.image, s.mask) for s in wide], [widen(s.image, s.mask, 0.4, s.name) for s in clean]]
    fig, axes = plt.subplots(2, args.n, figsize=(2.6 * args.n, 5.4))
    for r, row in enumerate(rows):
        for c, (image, mask) in enumerate(row):
            ax = axes[r][c]
            ax.imshow(image.permute(1, 2, 0).numpy())
            edge = boundary(mask[0].bool()).numpy()
            ys, xs = edge.nonzero()
            ax.scatter(xs, ys, s=0.3, c="lime")
            est = estimate_disc(image, ref)
            box = step.choose_box(est, 256)
            ax.add_patch(Circle((est.cx * 256, est.cy * 256), est.radius * 256, fill=False, ec="yellow", lw=1))
            ax.add_patch(Rectangle((box.x0, box.y0), box.side, box.side, fill=False, ec="cyan", lw=1.5))
            ax.set_title(f"zoom {256 / box.side:.1f}", fontsize=9)
            ax.set_axis_off()
    fig.suptitle("geometry step on synthetic images: true disc (green), estimate (yellow), crop (cyan)", fontsize=10)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"-> {args.out}")
    return args.out


if __name__ == "__main__":
    main()
