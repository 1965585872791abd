"""Wider-field variants of a labelled domain: each image shown smaller in a larger circular field.

A site with another crop protocol images the same anatomy with the disc smaller and off-centre in
a wider field of view, black outside the camera's circular aperture. `widen` makes that from a
disc-centred crop: the crop is shrunk by `scale`, placed off-centre (a fixed offset per image name)
inside a circular field filled with the crop's own border colour (a smooth stand-in for the retina
a wider crop would show), and the mask moves with it. Dice is then measured in the wide frame.
"""
from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F

from grata.data import Sample


def _offset(name: str, reach: float) -> tuple[float, float]:
    """A fixed (dy, dx) in [-reach, reach] per image name (reproducible, no global RNG)."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return tuple(float(v) for v in (torch.rand(2, generator=g) * 2 - 1) * reach)  # type: ignore[return-value]


def widen(image: torch.Tensor, mask: torch.Tensor | None, scale: float, name: str
          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """image [3, S, S] in [0, 1], mask [2, S, S] or None -> the same at `scale` (0 < scale <= 1) in a
    wider circular field of view, same S x S frame."""
    if not 0 < scale <= 1:
        raise ValueError(f"data.field_scale={scale}: must lie in (0, 1]")
    if scale == 1:
        return image, mask
    s = image.shape[-1]
    side = max(8, int(round(s * scale)))
    small = F.interpolate(image[None], size=(side, side), mode="bilinear", antialias=True, align_corners=False)[0]
    # off-centre, but the whole crop stays inside the circular field (radius 0.48 s)
    reach = max(0.0, (0.48 * s - side / 2 * 2 ** 0.5) / s)
    dy, dx = _offset(name, reach)
    y0, x0 = int(round(s / 2 + dy * s - side / 2)), int(round(s / 2 + dx * s - side / 2))
    y0, x0 = min(max(y0, 0), s - side), min(max(x0, 0), s - side)
    border = torch.cat([small[:, 0], small[:, -1], small[:, :, 0], small[:, :, -1]], dim=1)
    canvas = border.median(dim=1).values.view(3, 1, 1).expand(3, s, s).clone()
    # feather the pasted crop's edge over a few pixels so its square border is not an edge to find
    ramp = torch.linspace(0, 1, side)
    edge = torch.minimum(ramp, ramp.flip(0)) * side / max(2.0, 0.04 * side)
    alpha = torch.minimum(edge[:, None], edge[None, :]).clamp(0, 1)
    region = canvas[:, y0:y0 + side, x0:x0 + side]
    canvas[:, y0:y0 + side, x0:x0 + side] = alpha * small + (1 - alpha) * region
    yy, xx = torch.meshgrid(torch.arange(s) + 0.5, torch.arange(s) + 0.5, indexing="ij")
    fov = ((yy - s / 2) ** 2 + (xx - s / 2) ** 2) <= (0.48 * s) ** 2
    canvas = canvas * fov
    wide_mask = None
    if mask is not None:
        m = F.interpolate(mask[None], size=(side, side), mode="nearest")[0]
        wide_mask = torch.zeros_like(mask)
        wide_mask[:, y0:y0 + side, x0:x0 + side] = m
    return canvas, wide_mask


class WideField(torch.utils.data.Dataset):
    """Every sample of `dataset` at `scale` in a wider circular field (see `widen`)."""

    def __init__(self, dataset, scale: float) -> None:
        if not 0 < scale <= 1:
            raise ValueError(f"data.field_scale={scale}: must lie in (0, 1]")
        self.dataset, self.scale = dataset, scale

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Sample:
        s = self.dataset[i]
        image, mask = widen(s.image, s.mask, self.scale, s.name)
        return Sample(image, mask, s.name)
