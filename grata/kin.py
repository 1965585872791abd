"""fed_kin: a site takes the evidence of sites like it to leave the source's BN statistics at once.

Measured (bench/federation_study.py, synthetic, ResUNet-18, 128 px): under `bn=auto` a site keeps
the source's BN statistics for its first `auto_warmup` (4) images and only then switches to each
image's own; on a large acquisition shift those first images score ~35 Dice instead of ~87, and
they are the whole cost a late joiner pays. The adapted BN affine parameters move too little in a
few dozen images to matter (fed_affine == local_only to 0.01 Dice), so sharing parameters buys
nothing; what a newcomer lacks is the *evidence* that its shift is a real, lasting one.

What a site releases, each round, under its one privacy budget (grata/privacy.py, OpenDP Gaussian):
the mean over the round's images of s = log(1 + stem shift ratio), clipped to [0, LOG_SHIFT_MAX].
The stem shift of an image is measured by the frozen source model (the input of its first BN layer,
a function of that image alone), so one replaced image moves the round's sum by at most
LOG_SHIFT_MAX: sensitivity LOG_SHIFT_MAX, whatever the adaptation state. One number a round, so
the noise does not drown it (a 128-number stem descriptor would need ~15x more images a release:
per-coordinate SNR ~ n / (sigma * sqrt(d))).

What a site does with the broadcast rows (every other site's noisy mean, image count and noise std),
locally, with its own exact, never-released shift: when its current image's shift is above the
switch threshold and the rows of sites whose shift matches its own (within their noise) say, with
their noise, that their shift lies above the threshold too, it switches to image statistics now
instead of after its warmup. No row matches (every site a different device, or no site has released
yet): nothing changes, the site behaves exactly as under local_only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

LOG_SHIFT_MAX = 8.0  # log(1 + ratio) bound: a shift ratio up to ~3000 x the source's own
SPREAD = 1.0  # how far (log units) one kind's images' shifts lie apart: the matching tolerance besides noise
Z = 2.0  # noise standard deviations a row's evidence must clear
# the released per-image scalar as grata.privacy.PrivateScalars declares fields: (lo, hi, stream-dependent);
# from the frozen source model, one image's value depends on that image alone
KIN_FIELDS: dict[str, tuple[float, float, bool]] = {"stem_shift": (0.0, LOG_SHIFT_MAX, False)}


def log_shift(ratio: float) -> float:
    """An image's stem shift ratio -> the released quantity, log(1 + ratio) in [0, LOG_SHIFT_MAX]."""
    if not math.isfinite(ratio):
        return LOG_SHIFT_MAX if ratio > 0 else 0.0
    return min(max(math.log1p(max(ratio, 0.0)), 0.0), LOG_SHIFT_MAX)


def release_std(noise_multiplier: float, count: int) -> float:
    """The noise std on a released round mean of `count` images (sensitivity LOG_SHIFT_MAX of the sum)."""
    return noise_multiplier * LOG_SHIFT_MAX / max(count, 1)


@dataclass
class KinRow:
    """One site's released evidence so far: noisy mean log shift, its images, the noise std of that mean."""
    mean: float
    count: int
    std: float

    def valid(self) -> bool:
        return (math.isfinite(self.mean) and math.isfinite(self.std) and self.std > 0 and self.count > 0
                and -LOG_SHIFT_MAX <= self.mean <= 2 * LOG_SHIFT_MAX)


def accumulate(rounds: list[tuple[float, int, float]]) -> KinRow:
    """A site's releases (noisy round mean, images, noise std) -> one row: the image-weighted mean and its std."""
    total = sum(n for _, n, _ in rounds)
    mean = sum(m * n for m, n, _ in rounds) / total
    std = math.sqrt(sum((s * n) ** 2 for _, n, s in rounds)) / total
    return KinRow(mean, total, std)


def confirms(own: float, rows: list[KinRow], threshold: float, min_images: int = 4) -> bool:
    """Whether the rows of sites like this one (own: this image's exact log shift) confirm a lasting shift.

    Kin: rows whose mean lies within Z noise stds + SPREAD of `own`. Confirmed when the kin hold at
    least `min_images` images and their inverse-variance pooled mean, minus Z of its std, still lies
    above log(1 + threshold)."""
    kin = [r for r in rows if r.valid() and abs(r.mean - own) <= Z * r.std + SPREAD]
    if not kin or sum(r.count for r in kin) < min_images:
        return False
    weights = [1 / r.std**2 for r in kin]
    pooled = sum(w * r.mean for w, r in zip(weights, kin)) / sum(weights)
    pooled_std = 1 / math.sqrt(sum(weights))
    return own > math.log1p(threshold) and pooled - Z * pooled_std > math.log1p(threshold)


__all__ = ["KIN_FIELDS", "KinRow", "LOG_SHIFT_MAX", "accumulate", "confirms", "log_shift", "release_std"]
