"""GraTa's augmentations as batched, pure torch functions.

Weak views are exactly invertible (flips and right-angle rotations), so a prediction made on a view
can be mapped back onto the original pixel grid. They need square images. The strong style
augmentation changes appearance only (no geometry), so its prediction needs no inverse.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# (name, forward, inverse) on tensors [..., H, W]
WEAK_VIEWS = (
    ("identity", lambda t: t, lambda t: t),
    ("hflip", lambda t: t.flip(-1), lambda t: t.flip(-1)),
    ("vflip", lambda t: t.flip(-2), lambda t: t.flip(-2)),
    ("rot90", lambda t: torch.rot90(t, 1, (-2, -1)), lambda t: torch.rot90(t, -1, (-2, -1))),
    ("rot180", lambda t: torch.rot90(t, 2, (-2, -1)), lambda t: torch.rot90(t, -2, (-2, -1))),
    ("rot270", lambda t: torch.rot90(t, 3, (-2, -1)), lambda t: torch.rot90(t, -3, (-2, -1))),
)


def weak_views(x: torch.Tensor) -> list[torch.Tensor]:
    """x [B, C, H, W] (H == W) -> the 6 views, each [B, C, H, W]: original first, then 5 weak views."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"weak views need square images, got {tuple(x.shape[-2:])}")
    return [fwd(x) for _, fwd, _ in WEAK_VIEWS]


def invert_views(outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Map each view's output [B, K, H, W] back to the original grid (same order as weak_views)."""
    return [inv(y) for (_, _, inv), y in zip(WEAK_VIEWS, outputs)]


def _per_channel(x: torch.Tensor, p: float, lo: float, hi: float, g: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A factor drawn from U(lo, hi) per image and channel [B, C, 1, 1], and a mask of where to apply it."""
    b, c = x.shape[:2]
    factor = lo + (hi - lo) * torch.rand(b, c, 1, 1, generator=g, dtype=x.dtype, device=x.device)
    apply = torch.rand(b, 1, 1, 1, generator=g, device=x.device) < p
    return factor, apply


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image and channel: x [B, C, H, W], sigma [B, C]."""
    b, c, h, w = x.shape
    radius = int(torch.ceil(3 * sigma.max()).item())
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma.reshape(-1, 1)) ** 2)
    k = k / k.sum(1, keepdim=True)  # [B*C, K]
    y = F.pad(x.reshape(1, b * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)
    y = F.conv2d(y, k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def strong_style(x: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
    """GraTa's strong style augmentation: x [B, C, H, W] in [0, 1] -> same shape, min-max per image.

    Brightness x U(0.5,1.5) p=.75; contrast U(0.5,1.5) p=.75 (range preserved); inverted gamma
    (half the draws in (0.5,1), half in (1,2)) p=.75; Gaussian noise, std ~ U(0,0.05), p=.5;
    Gaussian blur, sigma ~ U(0.5,1.5) per channel, p=.5 per channel. Factors are per channel.
    """
    x = x.clone()
    f, on = _per_channel(x, 0.75, 0.5, 1.5, g)
    x = torch.where(on, x * f, x)

    f, on = _per_channel(x, 0.75, 0.5, 1.5, g)
    mean = x.mean((2, 3), keepdim=True)
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    x = torch.where(on, ((x - mean) * f + mean).clamp(lo, hi), x)

    _, on = _per_channel(x, 0.75, 0, 1, g)
    below = torch.rand(x.shape[0], x.shape[1], 1, 1, generator=g, device=x.device) < 0.5
    u = torch.rand(x.shape[0], x.shape[1], 1, 1, generator=g, dtype=x.dtype, device=x.device)
    gamma = torch.where(below, 0.5 + 0.5 * u, 1 + u)
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    rng = (hi - lo).clamp_min(1e-7)
    inverted = 1 - (x - lo) / rng  # gamma on the inverted image, then back
    x = torch.where(on, (1 - inverted.clamp(0, 1) ** gamma) * rng + lo, x)

    std, on = _per_channel(x[:, :1], 0.5, 0.0, 0.05, g)
    noise = torch.randn(x.shape, generator=g, dtype=x.dtype, device=x.device)
    x = torch.where(on, x + noise * std, x)

    sigma = 0.5 + torch.rand(x.shape[0], x.shape[1], generator=g, dtype=x.dtype, device=x.device)
    on = (torch.rand(x.shape[0], x.shape[1], 1, 1, generator=g, device=x.device) < 0.5)
    x = torch.where(on, _blur(x, sigma), x)

    flat = x.flatten(1)
    lo, hi = flat.min(1).values.view(-1, 1, 1, 1), flat.max(1).values.view(-1, 1, 1, 1)
    return (x - lo) / (hi - lo).clamp_min(1e-8)
