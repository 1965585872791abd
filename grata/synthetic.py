"""Synthetic fundus domains, made on the fly: the embedded default for demos and tests.

Each image is an optic-disc-centred crop: orange-red background with low-frequency texture,
a bright disc (ellipse) with a brighter cup inside it, and dark vessels leaving the disc. A domain
*style* then changes the acquisition (colour cast, gamma, contrast, blur, noise, uneven light, disc
scale), which is what a model trained on one style must adapt to. Sample i of (domain, split, seed)
is always the same image. Cost: a few ms per 256 px image.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from grata.data import Sample, minmax


@dataclass(frozen=True)
class Style:
    gains: tuple[float, float, float] = (1.0, 1.0, 1.0)  # per-channel colour cast
    gamma: float = 1.0
    contrast: float = 1.0  # 1 = unchanged; <1 compresses towards the mean
    blur_sigma: float = 0.0  # in pixels at 256 px, scaled with the image size
    noise_std: float = 0.0
    illumination: float = 0.0  # strength of a linear light gradient across the crop
    glare: float = 0.0  # brightness of a haze blob near the crop's edge (a bright, disc-like distractor)
    disc_scale: float = 1.0
    disc_offset: float = 0.12  # the disc centre's range around the frame centre (fraction of the half-side)
    field_of_view: float = 0.0  # > 0: black outside a centred circle of this radius (fraction of the half-side)


STYLES: dict[str, Style] = {
    "clean": Style(),
    "colour_cast": Style(gains=(0.55, 1.0, 1.6), gamma=1.3),
    "gamma": Style(gamma=2.6),
    "low_contrast": Style(contrast=0.3, noise_std=0.03, gamma=0.7),
    "blur": Style(blur_sigma=5.0, gamma=1.5, gains=(1.0, 0.9, 0.8)),
    "noise": Style(noise_std=0.18),
    "uneven_light": Style(illumination=0.8, glare=0.7, gamma=1.4, gains=(0.85, 1.0, 1.15)),
    "large_disc": Style(disc_scale=1.7, gains=(1.0, 0.75, 0.7), gamma=1.3),
    # the full field of another crop protocol: small disc anywhere in a circular field of view
    "wide_field": Style(disc_scale=0.4, disc_offset=0.5, field_of_view=0.96, gamma=1.2, illumination=0.3),
}


def _generator(seed: int, domain: str, split: str, index: int) -> torch.Generator:
    key = f"{seed}/{domain}/{split}/{index}".encode()
    return torch.Generator().manual_seed(zlib.crc32(key))


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g).item()


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [C, H, W] with reflect padding."""
    radius = max(1, int(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(x.dtype)
    c = x.shape[0]
    x = F.pad(x[None], (radius, radius, 0, 0), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.pad(x, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)[0]


def render(size: int, style: Style, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One image [3, S, S] in [0, 1] and its mask [2, S, S] (disc, cup)."""
    lin = torch.linspace(-1, 1, size)
    y, x = torch.meshgrid(lin, lin, indexing="ij")
    cx, cy = _uniform(g, -style.disc_offset, style.disc_offset), _uniform(g, -style.disc_offset, style.disc_offset)
    rd = _uniform(g, 0.24, 0.34) * style.disc_scale
    aspect = _uniform(g, 0.88, 1.12)
    rc = rd * _uniform(g, 0.35, 0.65)
    ox, oy = _uniform(g, -0.15, 0.15) * (rd - rc), _uniform(g, -0.15, 0.15) * (rd - rc)
    d_disc = torch.sqrt(((x - cx) / rd) ** 2 + ((y - cy) / (rd * aspect)) ** 2)
    d_cup = torch.sqrt(((x - cx - ox) / rc) ** 2 + ((y - cy - oy) / (rc * aspect)) ** 2)
    disc, cup = d_disc <= 1, d_cup <= 1

    # background: warm base colour with a few low-frequency waves and a darker macula side
    tex = torch.zeros(size, size)
    for _ in range(4):
        fx, fy, ph = _uniform(g, 0.5, 3), _uniform(g, 0.5, 3), _uniform(g, 0, 2 * math.pi)
        tex += 0.05 * torch.sin(math.pi * (fx * x + fy * y) + ph)
    side = 1 if _uniform(g, 0, 1) > 0.5 else -1
    tex -= 0.15 * torch.exp(-(((x - side * 0.9) ** 2 + (y - cy) ** 2) / 0.25))
    base = torch.tensor([0.78, 0.36, 0.16]).view(3, 1, 1) * (1 + tex)

    # disc and cup: soft-edged bright regions
    disc_soft = torch.sigmoid((1 - d_disc) * 25)
    cup_soft = torch.sigmoid((1 - d_cup) * 20)
    img = base + disc_soft * torch.tensor([0.2, 0.38, 0.28]).view(3, 1, 1)
    img = img + cup_soft * torch.tensor([0.05, 0.18, 0.22]).view(3, 1, 1)

    # vessels: curves in polar coordinates around the disc centre, thinner far from it
    r = torch.sqrt((x - cx) ** 2 + (y - cy) ** 2) + 1e-6
    phi = torch.atan2(y - cy, x - cx)
    for _ in range(int(_uniform(g, 6, 11))):
        theta, amp, freq, ph = _uniform(g, -math.pi, math.pi), _uniform(g, 0.1, 0.4), _uniform(g, 1, 4), _uniform(g, 0, 6.28)
        width = _uniform(g, 0.012, 0.03)
        dphi = torch.remainder(phi - theta - amp * torch.sin(freq * r + ph) + math.pi, 2 * math.pi) - math.pi
        vessel = torch.exp(-((dphi * r) / (width * (1.3 - 0.5 * r.clamp(max=1)))) ** 2) * (r > 0.3 * rd)
        img = img * (1 - 0.45 * vessel * torch.tensor([0.5, 1.0, 1.0]).view(3, 1, 1))

    # acquisition style
    img = img.clamp(0, 1) * torch.tensor(style.gains).view(3, 1, 1)
    if style.illumination:
        angle = _uniform(g, 0, 2 * math.pi)
        ramp = (math.cos(angle) * x + math.sin(angle) * y) / 2 + 0.5
        img = img * (1 - style.illumination * ramp)
    if style.glare:
        angle = _uniform(g, 0, 2 * math.pi)
        gx, gy = 0.75 * math.cos(angle), 0.75 * math.sin(angle)
        img = img + style.glare * torch.exp(-((x - gx) ** 2 + (y - gy) ** 2) / 0.08)
    img = img.clamp(0, 1) ** style.gamma
    if style.contrast != 1.0:
        img = img.mean() + style.contrast * (img - img.mean())
    if style.blur_sigma:
        img = _gaussian_blur(img, style.blur_sigma * size / 256)
    if style.noise_std:
        img = img + style.noise_std * torch.randn(img.shape, generator=g)
    img = img.clamp(0, 1)
    if style.field_of_view:  # the camera's aperture: nothing is imaged outside it
        img = img * (torch.sqrt(x ** 2 + y ** 2) <= style.field_of_view)
    return minmax(img), torch.stack([disc, cup]).float()


def style_of(domain: str) -> str:
    """A domain's style: its name, or for `<style>-<k>` or `<style>-<letter>` (another hospital of that
    style, with its own images: the name seeds them) the part before the dash."""
    base, dash, k = domain.rpartition("-")
    style = base if dash and (k.isdigit() or (len(k) == 1 and k.islower())) else domain
    if style not in STYLES:
        raise ValueError(f"synthetic domain {domain!r}: choose one of {sorted(STYLES)}, or <style>-<k> / <style>-<letter> for more sites")
    return style


class SyntheticDomain(torch.utils.data.Dataset):
    """`n` synthetic images of one named style; domain and split names give disjoint, reproducible samples."""

    def __init__(self, domain: str, n: int = 64, size: int = 256, split: str = "test", seed: int = 0):
        self.style = style_of(domain)
        if n < 1 or size % 32:
            raise ValueError(f"synthetic domain needs n >= 1 and size a multiple of 32 (got n={n}, size={size})")
        self.domain, self.n, self.size, self.split, self.seed = domain, n, size, split, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Sample:
        if not 0 <= i < self.n:
            raise IndexError(i)
        image, mask = render(self.size, STYLES[self.style], _generator(self.seed, self.domain, self.split, i))
        return Sample(image, mask, f"{self.domain}_{self.split}_{i:04d}")
