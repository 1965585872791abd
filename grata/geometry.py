"""The geometry step: find the optic disc, segment a crop at the source's scale, map it back.

Hospitals crop fundus photographs differently (tight disc-centred crops, wider crops, the full
field). A source model predicts a disc at its training scale wherever it looks, and no BN statistic
or affine update changes scale. This stage, label-free and independent of the adapter:

1. `locate`: a classical, model-free estimate of the disc's centre and radius: the bright, compact
   blob with the strongest scale-normalised Laplacian-of-Gaussian response inside the camera's
   field of view, at a 96 px working copy (milliseconds). Its size is calibrated once on the
   source's own training images (`geometry_reference`, kept in the checkpoint under "geometry").
2. `choose_box`: a square crop centred on the disc whose side makes the disc cover the source's
   median share of the crop. When that crop would be about the whole frame (the site already
   images at the source's scale) or no plausible disc is found, the whole image is used unchanged.
3. The adapter segments the crop (resized to the model's size and min-max normalised, so BN
   statistics and GraTa steps see source-like inputs); `paste` maps the logits back.
4. A check on the adapter's own prediction: a disc that is missing or fills / touches the crop
   means the estimate was off; the adapter's state is restored and the step re-run once on a
   corrected crop (or on the whole image).

On a wider field the crop starts at `rim_centre` (the circle of the disc's rim in the red channel,
searched around `disc_centre`, the whole bright disc's centre at the detector's scale; the
detector's blob is the brighter cup) and is refined on the model's own disc in the crop
(`GeometryStep.plan`). Near the source's scale the crop is placed on the model's own disc, and
only when most of the site's images so far show another scale (`site_vote`). `crop_summary` turns
a round's per-image outcome into the site's crop protocol.

Predictions always come back in the original image's frame. `estimate_disc` is the per-image
estimate (centre, radius, share relative to the source's) as a plain function for quality
features and a site's crop-protocol summary.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy import ndimage

WORK = 96  # working resolution of the classical detector (px); a disc of 3 % of the frame is ~3 px radius
BACKGROUND_QUANTILE = 0.3  # the field brightness taken for background (the disc may cover half a tight crop)
OUTSIDE_LOGIT = -20.0  # logits pasted outside the crop: certain background
SITE_SHARES = 16  # the model's whole-image discs a site keeps to size a near-scale crop without a probe


# --- crop and map back ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Box:
    """A square in original-frame pixels (may extend past the frame; what lies outside reads as black)."""
    y0: int
    x0: int
    side: int

    @staticmethod
    def whole(h: int, w: int) -> Box:
        if h != w:
            raise ValueError(f"the geometry step needs square frames, got {h}x{w}")
        return Box(0, 0, h)

    def is_whole(self, h: int, w: int) -> bool:
        return (self.y0, self.x0, self.side) == (0, 0, h) and h == w

    def as_dict(self) -> dict[str, int]:
        return {"y0": self.y0, "x0": self.x0, "side": self.side}


def _window(box: Box, h: int, w: int) -> tuple[slice, slice, slice, slice]:
    """(frame rows, frame cols, box rows, box cols) of the part of `box` inside an h x w frame."""
    fy0, fx0 = max(box.y0, 0), max(box.x0, 0)
    fy1, fx1 = min(box.y0 + box.side, h), min(box.x0 + box.side, w)
    if fy1 <= fy0 or fx1 <= fx0:
        raise ValueError(f"crop {box} lies outside the {h}x{w} frame")
    return (slice(fy0, fy1), slice(fx0, fx1),
            slice(fy0 - box.y0, fy1 - box.y0), slice(fx0 - box.x0, fx1 - box.x0))


def crop(x: torch.Tensor, box: Box, size: int, mode: str = "bilinear") -> torch.Tensor:
    """x [B, C, H, W] -> the box resized to [B, C, size, size]; zero outside the frame.

    mode "bilinear" (images: antialiased when shrinking) or "nearest" (masks).
    """
    b, c, h, w = x.shape
    fy, fx, by, bx = _window(box, h, w)
    out = x.new_zeros(b, c, box.side, box.side)
    out[:, :, by, bx] = x[:, :, fy, fx]
    if box.side == size:
        return out
    if mode == "nearest":
        return F.interpolate(out, size=(size, size), mode="nearest")
    return F.interpolate(out, size=(size, size), mode="bilinear", align_corners=False, antialias=box.side > size)


def paste(y: torch.Tensor, box: Box, frame: tuple[int, int], fill: float = OUTSIDE_LOGIT,
          mode: str = "bilinear") -> torch.Tensor:
    """Inverse of `crop`: y [B, C, s, s] (the crop's output) -> [B, C, H, W] in the original frame,
    `fill` where the crop did not reach. Logits are resized bilinearly, masks with mode "nearest"."""
    h, w = frame
    if y.shape[-1] != box.side:
        if mode == "nearest":
            y = F.interpolate(y, size=(box.side, box.side), mode="nearest")
        else:
            y = F.interpolate(y, size=(box.side, box.side), mode="bilinear", align_corners=False,
                              antialias=y.shape[-1] > box.side)
    fy, fx, by, bx = _window(box, h, w)
    out = y.new_full((*y.shape[:2], h, w), fill)
    out[:, :, fy, fx] = y[:, :, by, bx]
    return out


def _minmax(x: torch.Tensor) -> torch.Tensor:
    flat = x.flatten(1)
    lo, hi = flat.min(1).values.view(-1, 1, 1, 1), flat.max(1).values.view(-1, 1, 1, 1)
    return (x - lo) / (hi - lo).clamp_min(1e-8)


# --- the classical disc detector -------------------------------------------------------------------
@dataclass(frozen=True)
class DiscEstimate:
    """One image's disc, in the image's own frame as fractions of its side (label-free).

    cy, cx: centre (0..1 from the top-left); radius: detector radius (calibrated) / side;
    share: the disc's estimated area / frame area; contrast: the blob's response in units of the
    field of view's brightness spread (how disc-like the winner is); found: plausible disc or not;
    field: the share of the frame inside the camera's field of view.
    """
    cy: float
    cx: float
    radius: float
    share: float
    contrast: float
    found: bool
    field: float = 1.0  # share of the frame inside the camera's field of view (< ~0.8: a circular aperture shows)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [N, 1, H, W], replicate padding."""
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))


def field_of_view(image: torch.Tensor, threshold: float = 0.06) -> torch.Tensor:
    """Pixels inside the camera's field of view (not the black surround): [3, H, W] -> bool [H, W]."""
    lit = _blur(image.amax(0)[None, None], 1.0)[0, 0] > threshold
    # erode: the rim of the field of view is a bright-to-black edge, not anatomy
    return -F.max_pool2d(-lit.float()[None, None], 5, 1, 2)[0, 0] > 0.5


def _refine_centre(z: torch.Tensor, valid: torch.Tensor, s_lo: float, s_hi: float, y: float, x: float
                   ) -> tuple[float, float]:
    """The blob's centre at the working resolution, near a coarse (y, x) found on a pooled level.

    The pyramid finds the scale, but a level pooled f times places the peak only to f pixels, which
    for a small disc is a tenth of the crop's side, and the model is not translation-invariant (it
    was trained on disc-centred crops: it pulls its predicted disc toward the crop's centre). Here the
    same difference of Gaussians runs unpooled in a window around the coarse peak, and the centre is
    the response-weighted mean of the part of the peak above 80 % of its maximum."""
    reach = int(math.ceil(s_hi)) + 2
    h, w = z.shape[-2:]
    y0, y1 = max(0, int(y) - reach), min(h, int(y) + reach + 1)
    x0, x1 = max(0, int(x) - reach), min(w, int(x) + reach + 1)
    margin = int(math.ceil(3 * s_hi)) + 1  # the blur's support, so the window's values are exact
    wy0, wy1, wx0, wx1 = max(0, y0 - margin), min(h, y1 + margin), max(0, x0 - margin), min(w, x1 + margin)
    zw = z[..., wy0:wy1, wx0:wx1]
    dog = (_blur(zw, s_lo) - _blur(zw, s_hi))[0, 0][y0 - wy0:y1 - wy0, x0 - wx0:x1 - wx0]
    ok = valid[0, 0, y0:y1, x0:x1] > 0.5
    dog = torch.where(ok, dog, torch.full_like(dog, -math.inf))
    top = dog.max()
    if not torch.isfinite(top) or top <= 0:
        return y, x
    weight = (dog - 0.8 * top).clamp_min(0)
    weight = torch.where(torch.isfinite(weight), weight, torch.zeros_like(weight))
    yy, xx = torch.meshgrid(torch.arange(y0, y1, dtype=z.dtype), torch.arange(x0, x1, dtype=z.dtype), indexing="ij")
    total = weight.sum()
    return float((weight * yy).sum() / total), float((weight * xx).sum() / total)


def detect_blob(image: torch.Tensor, min_radius: float = 0.025, max_radius: float = 0.45, refine: bool = True,
                field: tuple[torch.Tensor | None, torch.Tensor] | None = None) -> tuple[float, float, float, float]:
    """The strongest bright blob of a fundus image [3, H, W] in [0, 1]: (cy, cx, radius, contrast),
    centre and radius as fractions of the side, radius uncalibrated (sqrt(2) x the best LoG sigma).

    Works on a WORK px copy. Outside the field of view the image is set to the field's median so
    the black surround makes no blob; the frame is padded with that median as well, so a disc that
    fills the frame is still scored at its scale. field: `_field_z(image)` when the caller has it.
    """
    z, fov = field if field is not None else _field_z(image)
    if z is None:
        return 0.5, 0.5, 0.0, 0.0
    pad = WORK // 2
    z = F.pad(z[None, None], (pad, pad, pad, pad), value=0.0)
    valid = F.pad(fov[None, None].float(), (pad, pad, pad, pad))
    ratio = 1.19
    sigmas = [WORK * min_radius / math.sqrt(2) * ratio ** k for k in range(40)]
    sigmas = [s for s in sigmas if s * math.sqrt(2) <= WORK * max_radius * ratio]
    best, peaks = (-math.inf, 0, 0, 0), []
    levels: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # pooled (z, valid) per pooling factor
    blurred: dict[tuple[int, int], torch.Tensor] = {}  # (sigma index, factor): each blur is used by two scales

    def blur(j: int, f: int) -> torch.Tensor:
        if f not in levels:
            levels[f] = (F.avg_pool2d(z, f), F.avg_pool2d(valid, f)) if f > 1 else (z, valid)
        if (j, f) not in blurred:
            blurred[(j, f)] = _blur(levels[f][0], sigmas[j] / f)
        return blurred[(j, f)]

    for k in range(len(sigmas) - 1):
        # large scales on a pooled copy (a pyramid): the kernel stays a few taps wide, the cost flat
        level = max(0, int(math.floor(math.log2(sigmas[k] / 2))))
        f = 2 ** level
        # scale-normalised difference of Gaussians ~ -sigma^2 LoG: positive on a bright blob of radius ~ sqrt(2) sigma
        dog = (blur(k, f) - blur(k + 1, f))[0, 0] / (ratio ** 2 - 1) * 2
        ok = levels[f][1][0, 0] > 0.999
        dog = torch.where(ok, dog, torch.full_like(dog, -math.inf))
        v, i = dog.flatten().max(0)
        peaks.append(v.item())
        if v.item() > best[0]:
            y, x = (int(i) // dog.shape[1] + 0.5) * f - 0.5, (int(i) % dog.shape[1] + 0.5) * f - 0.5
            best = (v.item(), y - pad, x - pad, k)
    value, y, x, k = best
    if refine:
        y, x = _refine_centre(z, valid, sigmas[k], sigmas[k + 1], y + pad, x + pad)
        y, x = y - pad, x - pad
    s = math.sqrt(sigmas[k] * sigmas[k + 1])
    if 0 < k < len(peaks) - 1 and all(math.isfinite(p) for p in peaks[k - 1:k + 2]):
        # the scale between the sampled ones: vertex of the parabola through the three peak responses
        a, b, c = peaks[k - 1:k + 2]
        curve = a - 2 * b + c
        if curve < 0:
            s *= ratio ** max(-0.5, min(0.5, 0.5 * (a - c) / curve))
    return (y + 0.5) / WORK, (x + 0.5) / WORK, s * math.sqrt(2) / WORK, float(value)


def _field_z(image: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(z, fov) of an image [3, H, W]: the WORK px brightness map the detector reads (grey level inside
    the field of view, in robust spreads above the field's 30th percentile, 0 outside; None when the
    field covers under 5 % of the frame) and the field-of-view mask [WORK, WORK]."""
    small = F.interpolate(image[None].float(), size=(WORK, WORK), mode="area")[0]
    fov = field_of_view(small)
    if fov.float().mean() < 0.05:
        return None, fov
    grey = small.mean(0)
    inside = grey[fov]
    med = inside.quantile(BACKGROUND_QUANTILE)  # the retina around the disc: what the padding stands for
    spread = (inside - med).abs().median().clamp_min(1e-3) * 1.4826  # robust std of the field
    return torch.where(fov, (grey - med) / spread, torch.zeros_like(grey)), fov


def disc_centre(image: torch.Tensor, est: DiscEstimate, clip: float = 0.3, reach: float = 1.0
                ) -> tuple[float, float]:
    """The centre of the whole bright disc near the detector's estimate `est` (fractions of the side).

    The detector's blob is the disc's brightest part, the cup, which lies off the disc's centre. Here
    the brightness is clipped at the `clip` quantile of the estimated disc's own pixels, so the disc
    reads as one plateau, and a difference of Gaussians tuned to the estimated disc radius peaks at
    the plateau's centre. Searched within `reach` radii of the detector's centre; the centre is the
    response-weighted mean of the part of the peak above 90 % of its maximum. Falls back to the
    detector's centre when the field or the disc is empty. clip 0.3 was chosen on the source's own
    widened training images (RIM_ONE_r2, labelled, field scales 0.6 and 0.4; docs/geometry.md)."""
    if image.ndim == 4:
        image = image[0]
    z, fov = _field_z(image)
    r = est.radius * WORK
    if z is None or r < 1 or not est.found:
        return est.cy, est.cx
    yy, xx = torch.meshgrid(torch.arange(WORK, dtype=z.dtype) + 0.5, torch.arange(WORK, dtype=z.dtype) + 0.5,
                            indexing="ij")
    dist = torch.hypot(yy - est.cy * WORK, xx - est.cx * WORK)
    in_disc = (dist <= r) & fov
    if in_disc.sum() < 4:
        return est.cy, est.cx
    zc = torch.minimum(z, z[in_disc].quantile(clip)).clamp_min(0)
    sigma = r / math.sqrt(2)
    dog = _blur(zc[None, None], sigma / 1.1) - _blur(zc[None, None], sigma * 1.1)
    dog = dog[0, 0]
    dog = torch.where((dist <= reach * r) & fov, dog, torch.full_like(dog, -math.inf))
    top = dog.max()
    if not torch.isfinite(top) or top <= 0:
        return est.cy, est.cx
    weight = torch.where(torch.isfinite(dog), (dog - 0.9 * top).clamp_min(0), torch.zeros_like(dog))
    total = weight.sum()
    return float((weight * yy).sum() / total) / WORK, float((weight * xx).sum() / total) / WORK


def rim_centre(image: torch.Tensor, est: DiscEstimate, start: tuple[float, float], reach: float = 0.6,
               radii: tuple[float, ...] = (0.8, 0.9, 1.0, 1.1, 1.2), angles: int = 64) -> tuple[float, float, float]:
    """The disc's centre from its rim: (cy, cx, radius) as fractions of the side, label-free.

    The optic disc is brighter than the retina around it, and in the red channel its rim is the
    strongest closed edge (the cup, which `detect_blob` and `disc_centre` are drawn to, shows in
    green; the vessels barely do). A circle of radius r centred at c scores the median, over
    `angles` points of its circumference, of the brightness gradient pointing into the circle:
    the median ignores the vessels and the gaps that cut a rim. Circles are tried at `radii` times the
    detector's radius, centred on a square grid of a 10th of the radius reaching `reach` radii each
    way from `start` (`disc_centre`'s estimate), then around the best on a grid of a 30th (and its
    radius +-5 %), at the
    frame's own resolution (about 7 ms at 256 px); the best circle wins. Red (green: worse than
    `disc_centre`), the median (the mean locks onto the field's edges) and the coarse-to-fine search
    were chosen on the source's own widened training images (RIM_ONE_r2, field scales 0.6 and 0.4:
    median offset from the mask's centre 0.20-0.22 -> 0.09 disc radii, share of images over 0.3
    radii 0.25-0.27 -> 0.13-0.14; docs/geometry.md). Returns `start` (and the detector's radius) when
    the detector found no disc or no circle is brighter inside than out."""
    if image.ndim == 4:
        image = image[0]
    s = image.shape[-1]
    r0 = est.radius * s
    if not est.found or r0 < 2:
        return start[0], start[1], est.radius
    dev = image.device
    red = _blur(image[0][None, None].float(), max(0.5, s / 256))
    gy = F.pad((red[..., 2:, 1:-1] - red[..., :-2, 1:-1]) / 2, (1, 1, 1, 1))
    gx = F.pad((red[..., 1:-1, 2:] - red[..., 1:-1, :-2]) / 2, (1, 1, 1, 1))
    grad = torch.cat([gy, gx], 1)  # [1, 2, S, S]
    theta = torch.arange(angles, dtype=torch.float32, device=dev) * (2 * math.pi / angles)
    unit = torch.stack([torch.sin(theta), torch.cos(theta)])  # [2, A]

    def search(cy: float, cx: float, half: float, step: float, factors) -> tuple[float, float, float, float]:
        """The best circle centred on a grid of `step` px within `half` px of (cy, cx), radius f x r0."""
        offsets = torch.arange(-math.ceil(half / step), math.ceil(half / step) + 1, dtype=torch.float32, device=dev) * step
        centres = torch.stack(torch.meshgrid(cy + offsets, cx + offsets, indexing="ij"), -1).view(-1, 2, 1)
        best = (-math.inf, cy, cx, r0)
        for f in factors:
            points = centres + f * r0 * unit  # [C, 2, A] in (y, x) px
            grid = (points.flip(1).transpose(1, 2) / s * 2 - 1)[None]  # [1, C, A, (x, y)]
            g = F.grid_sample(grad, grid, align_corners=False)[0]  # [2, C, A]
            score = -(g * unit[:, None]).sum(0).median(-1).values  # bright inside: the gradient points in
            v, i = score.max(0)
            if v.item() > best[0]:
                best = (v.item(), float(centres[i, 0, 0]), float(centres[i, 1, 0]), f * r0)
        return best

    # coarse to fine: a tenth of the radius over the reach and every radius, then a 30th around the best
    score, cy, cx, r = search(start[0] * s, start[1] * s, reach * r0, max(0.5, r0 / 10), radii)
    if score <= 0:  # no circle is brighter inside than out: no rim to go by
        return start[0], start[1], est.radius
    f = r / r0
    _, cy, cx, r = search(cy, cx, r0 / 10, max(0.5, r0 / 30), (f - 0.05, f, f + 0.05))
    return cy / s, cx / s, r / s


def estimate_disc(image: torch.Tensor, reference: dict) -> DiscEstimate:
    """The disc of one image [3, H, W] (or [1, 3, H, W]) in [0, 1], label-free, calibrated by the
    source's `reference` (`geometry_reference`). A quality feature and a site's crop protocol:
    share / reference["disc_share"] says how much smaller (< 1) or larger the site images the disc."""
    if image.ndim == 4:
        image = image[0]
    z, fov = _field_z(image)  # read once: the detector's map and the field's share of the frame
    cy, cx, r, contrast = detect_blob(image, field=(z, fov))
    field = fov.float().mean().item()
    radius = r * reference.get("detector_gain", 1.0)
    share = math.pi * radius ** 2
    found = contrast >= reference.get("min_contrast", 1.0) and radius > 0
    return DiscEstimate(cy, cx, radius, share, contrast, found, field)


def crop_protocol(estimates: list[DiscEstimate], reference: dict) -> dict[str, float]:
    """A site's crop protocol from its images' estimates (label-free), for its summary: the share of
    images with a plausible disc, the median disc scale relative to the source's (linear: 1 = the
    source's scale, 0.5 = half the source's diameter) and the median disc centre (fractions of the side)."""
    found = [e for e in estimates if e.found]
    if not found:
        return {"images": float(len(estimates)), "found_share": 0.0, "relative_scale": float("nan"),
                "centre_y": float("nan"), "centre_x": float("nan")}
    t = torch.tensor([[math.sqrt(e.share / reference["disc_share"]), e.cy, e.cx] for e in found])
    med = t.median(0).values
    return {"images": float(len(estimates)), "found_share": len(found) / len(estimates),
            "relative_scale": float(med[0]), "centre_y": float(med[1]), "centre_x": float(med[2])}


def crop_summary(steps: list[dict]) -> dict[str, float]:
    """A site's crop protocol over a round, from its adapter's per-image diagnostics (`last_step` with
    the geometry step on): geo_cropped_share, the share of images segmented on a crop (0: the site
    images at the source's scale), and geo_zoom, the median zoom (frame side / crop side; 1 = the whole
    image, 2.5 = a crop 0.4 of the frame's side). {} when the step was off. Label-free, per round."""
    geo = [s for s in steps if "geo_zoom" in s and "geo_cropped" in s]
    if not geo:
        return {}
    zoom = torch.tensor([float(s["geo_zoom"]) for s in geo])
    return {"geo_cropped_share": sum(float(s["geo_cropped"]) for s in geo) / len(geo),
            "geo_zoom": float(zoom.median())}


# --- the source's reference -------------------------------------------------------------------------
def geometry_reference(images: torch.Tensor, masks: torch.Tensor) -> dict:
    """The source domain's crop protocol, from its labelled training split: images [N, 3, H, W],
    masks [N, 2, H, W]. disc_share: median disc area / frame area; detector_gain: median true radius
    / detector radius on the same images (calibrates the blob detector's scale on the source only);
    min_contrast: a detector response below which no disc is trusted (a fifth of the source's 10th
    percentile)."""
    area = masks[:, 0].flatten(1).float().mean(1)
    keep = area > 0
    if not keep.any():
        raise ValueError("geometry reference: no source training mask contains a disc")
    true_r = torch.sqrt(area[keep] / math.pi)
    det = [detect_blob(im) for im in images[keep]]
    det_r = torch.tensor([d[2] for d in det]).clamp_min(1e-6)
    contrast = torch.tensor([d[3] for d in det])
    share = area[keep]
    return {
        "disc_share": float(share.median()),
        "disc_share_p10": float(share.quantile(0.1)),
        "disc_share_p90": float(share.quantile(0.9)),
        "detector_gain": float((true_r / det_r).median()),
        "min_contrast": float(contrast.quantile(0.1)) / 5,
        "images": int(keep.sum()),
    }


def ensure_reference(meta: dict, load_train: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """The checkpoint's "geometry" metadata, or (checkpoints from before it existed) computed from
    the source's training split, `load_train()` -> (images [N,3,S,S], masks [N,2,S,S]), and kept in
    `meta` for the rest of the process (the checkpoint file is not rewritten)."""
    if not meta.get("geometry"):
        meta["geometry"] = geometry_reference(*load_train())
    return meta["geometry"]


# --- the step ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PredictedDisc:
    """The model's disc in one pass (largest component of its disc mask), in original-frame fractions:
    centre, share of the frame, and whether it touches the crop's edge."""
    cy: float
    cx: float
    share: float
    edge: float


def predicted_disc(logits: torch.Tensor, box: Box, size: int) -> PredictedDisc | None:
    """The largest connected disc component of logits [1, 2, s, s] made on `box` of a size x size
    frame; None when the model sees no disc. Smaller components (a bright exudate, the canvas edge)
    would drag the centroid, and the crop is only as good as its centre."""
    disc = (logits[0, 0] > 0).cpu().numpy()
    labels, n = ndimage.label(disc)
    if n == 0:
        return None
    if n > 1:
        sizes = ndimage.sum_labels(disc, labels, index=range(1, n + 1))
        disc = labels == (int(sizes.argmax()) + 1)
    ys, xs = disc.nonzero()
    s = disc.shape[0]
    scale = box.side / s
    edge = float((disc[0].sum() + disc[-1].sum() + disc[:, 0].sum() + disc[:, -1].sum()) / (4 * s))
    return PredictedDisc(cy=(box.y0 + (ys.mean() + 0.5) * scale) / size, cx=(box.x0 + (xs.mean() + 0.5) * scale) / size,
                         share=float(disc.mean()) * (box.side / size) ** 2, edge=edge)


@dataclass
class GeometryStep:
    """Crop to the source's scale around the disc, segment through `step`, map back.

    reference: `geometry_reference` of the source.
    Two paths (docs/geometry.md), chosen per image without labels from a first pass of the model on
    the whole image (`probe`: a forward with the adapter's current parameters, nothing adapted):
    - near the source's scale (the classical detector's disc is not much smaller than the model's):
      the crop is placed and sized on the model's own disc (the model is reliable near its scale);
    - a wider field (the detector sees a disc below `route` times the model's, and the disc is a small
      part of the field: contrast of at least `min_contrast` robust spreads, or a visible circular
      aperture, the field of view covering less than `aperture` of the frame): the model draws a
      disc at its training scale wherever it looks, so the crop starts from the classical detector's disc.
    Either path then re-centres and re-sizes on the model's disc in the crop `refine` times. The model
    pulls its disc toward the crop's centre (it was trained on disc-centred crops), so a re-centring
    moves `gain` times the offset it sees. keep_whole: a crop at least this share of the frame is
    the whole image; min_side: never crop tighter than this share of the frame.
    Without a probe (`apply(..., probe=None)`) or with use_model=False, only the detector's crop is
    used (no model pass before the step: below one forward's cost), checked once by the adapter's own
    prediction (`retry`).
    centre: where the wider-field crop starts, "rim" (`rim_centre`: the rim's circle, searched
    around `disc_centre`), "disc" (`disc_centre`: the whole bright disc's centre) or "detector" (the
    detector's blob, the disc's brightest part). settle: stop refining when the
    next crop would move less than this share of the side (early exit: no further probe). sure_wide:
    a disc the detector sees below this linear size (relative to the source's), small in its field,
    takes the wider-field path without the whole-image probe (0: always probe). probe_size: the
    refinement probes' resolution (0: the frame's; below it, a probe re-centres only and keeps the
    crop's side, because the model's disc size is not reliable off its training resolution).
    site_vote: a site's crop protocol is the site's, not one image's: the near-scale path crops an
    image only when more than this share of the site's images so far (this one included) were seen
    at another scale than the source's (the wider-field path, or a whole-image model disc below
    keep_whole). One shifted-style image can make the model draw its disc small (RIM_ONE_r3 at the
    source's own scale: 5 of 137 images cropped, every one lost), where a site with another crop
    protocol shows it on nearly every image (Drishti_GS: 98 of 101); none of the source's own held-out
    images shows it (docs/geometry.md, "The site's vote"). 0: each image alone. The wider-field path
    (the detector's strong evidence) never waits for the vote. `reset` forgets the site's images.
    site_min: a site whose crop protocol is known skips the whole-image probe. The probe routes an
    image and, near the source's scale, sizes its crop; once the site has shown at least this many
    images, its vote says the first and its earlier images the second, and a cropped image cannot
    reuse the probe as its first pass. Two cases, each for an image whose detector disc is
    plausible and below `route` of the source's linear size:
    - more than `site_vote` of the site's images took the wider-field path, and this image's disc is
      small in its field: it takes that path without the probe;
    - more than `site_vote` of them were near-scale crops and at most a tenth took the wider-field
      path (a near-scale site, Drishti_GS-like): the crop is centred where the rim is (as on the
      wider-field path) and sized by the median of the model's whole-image discs on the site's
      earlier near-scale images (`shares`, the last SITE_SHARES; a wider field's whole-image disc is
      the model's training size, not the disc's), not by the detector, which sizes a near-scale
      disc worse than the model (starting there cost Drishti_GS 1.8 Dice).
    Either way the model's disc in the crop then refines it, and the image votes by its final crop,
    after the retry (refined or retried back to the whole image, it votes "the source's scale", so
    a site wrongly taken for another scale corrects itself; with `refine=0` nothing could refine it
    back, so the site's protocol is not used). 0: every image is routed on its own probe.
    reuse_settled: when refinement settles, segment the crop the last probe looked at (that probe is
    then the step's own first pass: one forward less per cropped image) instead of the settled re-centred
    crop. On by default with one refinement: with `site_min` they take the placement from 1.23-2.26
    model passes per image on every cropped cell of issue 13's table to 0.20-0.83, for Dice within
    -0.89 to +0.28 of two refinements without reuse per cell, -0.08 on average (docs/geometry.md).
    The step's input is the whole-image probe's very tensor when the image is kept whole (and a settled
    refinement's with reuse_settled), so an adapter reuses that pass (`apply(..., first_pass=)`).
    """
    reference: dict
    keep_whole: float = 0.9
    min_side: float = 0.12
    route: float = 0.8
    min_contrast: float = 5.0
    aperture: float = 0.9
    refine: int = 1
    gain: float = 1.5
    retry: bool = True
    use_model: bool = True
    probe_size: int = 0
    centre: str = "rim"
    settle: float = 0.04
    sure_wide: float = 0.5
    reuse_settled: bool = True
    site_vote: float = 0.5
    site_min: int = 4

    def __post_init__(self) -> None:
        missing = {"disc_share", "detector_gain"} - set(self.reference)
        if missing:
            raise ValueError(f"geometry reference lacks {sorted(missing)} (checkpoint metadata 'geometry')")
        if not 0 < self.reference["disc_share"] < 1:
            raise ValueError(f"geometry reference disc_share={self.reference['disc_share']} must lie in (0, 1)")
        if not 0 < self.reference["detector_gain"] < math.inf:  # it may come over the wire with the model
            raise ValueError(f"geometry reference detector_gain={self.reference['detector_gain']} must be finite and > 0")
        if not 0 < self.keep_whole <= 1.5 or not 0 < self.min_side < 1:
            raise ValueError(f"geometry keep_whole={self.keep_whole} / min_side={self.min_side} out of range")
        if self.centre not in ("rim", "disc", "detector") or not (self.probe_size == 0 or 32 <= self.probe_size <= 1024):
            raise ValueError(f"geometry centre={self.centre!r} (rim | disc | detector), probe_size={self.probe_size} "
                             "(0: the frame's size, else 32-1024 px)")
        if not 0 <= self.settle < 0.5 or not 0 <= self.site_vote < 1 or not 0 <= self.site_min <= SITE_SHARES:
            raise ValueError(f"geometry settle={self.settle} must lie in [0, 0.5), site_vote={self.site_vote} in [0, 1), "
                             f"site_min={self.site_min} in [0, {SITE_SHARES}]")
        if (not 0 < self.route <= 1 or self.refine < 0 or not 1 <= self.gain <= 3 or self.min_contrast < 0
                or not 0 < self.aperture <= 1):
            raise ValueError(f"geometry route={self.route} (0, 1], refine={self.refine} >= 0, gain={self.gain} "
                             f"[1, 3], min_contrast={self.min_contrast} >= 0, aperture={self.aperture} (0, 1]")
        self.last: dict[str, float] = {}
        self._probed: tuple[Box, torch.Tensor] | None = None  # the last full-size probe's (box, input)
        self.boxes: list[tuple[Box, int]] = []  # the last call's (box, frame side) per image
        self.votes = (0, 0, 0)  # the site's images so far: (seen at another scale than the source's, all, wider field)
        self._known_vote: tuple[bool, bool] | None = None  # the last image's vote when the site's protocol placed it
        self.shares: list[float] = []  # the model's whole-image disc (share of the frame) on its last near-scale images

    def reset(self) -> None:
        """A new site (or the same site from scratch): its crop protocol is not known yet."""
        self.votes, self.shares = (0, 0, 0), []

    def _site_protocol(self) -> str:
        """What the site's images so far say: "wide" (most took the wider-field path), "near" (most
        were near-scale crops, at most a tenth wider fields, and the model's disc is known from
        `site_min` of them), or "" (not known: fewer than `site_min` images, no refinement to correct
        a wrong protocol, a mixed site, or one imaging at the source's scale)."""
        other, seen, wide = self.votes
        if not 0 < self.site_min <= seen or self.refine == 0:
            return ""
        if wide / seen > self.site_vote:
            return "wide"
        near = (other - wide) / seen > self.site_vote and wide <= 0.1 * seen
        return "near" if near and len(self.shares) >= self.site_min else ""

    def _vote(self, other: bool, wide: bool) -> float:
        """Count one image of the site; the share of its images so far seen at another scale."""
        o, n, w = self.votes
        self.votes = (o + int(other or wide), n + 1, w + int(wide))
        return self.votes[0] / self.votes[1]

    def _unvote(self, other: bool, wide: bool) -> None:
        """Take back what `_vote(other, wide)` counted, the image staying counted as seen."""
        o, n, w = self.votes
        self.votes = (o - int(other or wide), n, w - int(wide))

    def _box_at(self, cy: float, cx: float, share: float, size: int) -> Box:
        """A square centred at (cy, cx) (fractions) in which a disc of `share` (of the frame) covers the
        source's share; the whole frame when that square is at least keep_whole of it."""
        side = math.sqrt(share / self.reference["disc_share"]) * size
        if side >= self.keep_whole * size:
            return Box.whole(size, size)
        side = int(round(max(side, self.min_side * size)))
        return Box(int(round(cy * size - side / 2)), int(round(cx * size - side / 2)), side)

    def choose_box(self, est: DiscEstimate, size: int) -> Box:
        """The crop for the detector's estimate in a size x size frame: disc-centred, disc share = the source's."""
        if not est.found:
            return Box.whole(size, size)
        return self._box_at(est.cy, est.cx, est.share, size)

    def _recentre(self, disc: PredictedDisc, box: Box, size: int, keep_side: bool = False) -> Box:
        """The next crop from the model's disc in `box`: centre moved `gain` times the disc's offset from
        the crop's centre (the model under-reports it), size so that the disc covers the source's share.
        A disc cut by the crop's edge is larger than it shows: the crop widens by at least half again."""
        c = ((box.y0 + box.side / 2) / size, (box.x0 + box.side / 2) / size)
        cy, cx = c[0] + self.gain * (disc.cy - c[0]), c[1] + self.gain * (disc.cx - c[1])
        share = disc.share * (2.25 if disc.edge >= 0.05 else 1.0)
        if keep_side:  # a coarse probe places the crop; its disc's size is not trusted
            share = self.reference["disc_share"] * (box.side / size) ** 2
        return self._box_at(cy, cx, share, size)

    def _check(self, logits: torch.Tensor, box: Box, size: int) -> Box | None:
        """Without a probe: None if the prediction on the crop looks like a disc at the source's scale;
        else the corrected crop (the predicted disc re-centred at the source's share, or the whole image)."""
        disc = predicted_disc(logits, box, size)
        if disc is None:
            return Box.whole(size, size)
        share = disc.share / (box.side / size) ** 2
        ref = self.reference["disc_share"]
        if disc.edge < 0.05 and ref / 2 < share < ref * 2:
            return None
        return self._recentre(disc, box, size)

    def _look(self, probe: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, box: Box, size: int,
              full: bool = False, first_pass: Callable[[torch.Tensor], torch.Tensor] | None = None
              ) -> PredictedDisc | None:
        """The model's disc in `box` of images [1, 3, S, S] from one probe pass: at the frame's size when
        `full` (the whole-image probe), else at `probe_size` px (0: the frame's size)."""
        n = size if full else (self.probe_size or size)
        if box.is_whole(size, size):
            x = images if n == size else crop(images, box, n)
        else:
            x = _minmax(crop(images, box, n))
        if n == size and first_pass is not None:  # the step's input should the crop stay here: its first pass
            self._probed = (box, x)
            probe = first_pass
        return predicted_disc(probe(x), box, size)

    def _input(self, images: torch.Tensor, box: Box) -> torch.Tensor:
        """The step's input for `box` of images [1, 3, S, S]: the last probe's very tensor when it looked
        at this box (so the adapter's first pass is that probe's), else the crop, min-max normalised."""
        _, _, h, w = images.shape
        if self._probed is not None and self._probed[0] == box:
            return self._probed[1]
        return images if box.is_whole(h, w) else _minmax(crop(images, box, h))

    def _settled(self, nxt: Box, box: Box) -> bool:
        """The next crop is (nearly) the current one: its centre moved less than `settle` of the side and
        its side changed by less than twice that, so another probe would not move it (early exit)."""
        shift = math.hypot(nxt.y0 + nxt.side / 2 - box.y0 - box.side / 2, nxt.x0 + nxt.side / 2 - box.x0 - box.side / 2)
        return shift <= self.settle * box.side and abs(nxt.side / box.side - 1) <= 2 * self.settle

    def plan(self, images: torch.Tensor, probe: Callable[[torch.Tensor], torch.Tensor],
             first_pass: Callable[[torch.Tensor], torch.Tensor] | None = None
             ) -> tuple[Box, DiscEstimate, dict[str, float]]:
        """The crop for one image [1, 3, S, S], label-free: route on the detector and the model's
        whole-image disc, then refine on the model's disc in the crop. Returns (box, detector
        estimate, diagnostics, among them `geo_probes`: the probe passes taken, each at `probe_size`)."""
        _, _, h, w = images.shape
        est = estimate_disc(images[0], self.reference)
        whole = Box.whole(h, w)
        ref = self.reference["disc_share"]
        det_side = math.sqrt(est.share / ref)
        # the disc must be a small part of the field: it stands out by many robust spreads, or the camera's
        # circular aperture shows (a full field). A tight crop fills the frame and its disc stands out less.
        small_in_field = est.contrast >= self.min_contrast or est.field < self.aperture
        sure = est.found and small_in_field and det_side < self.sure_wide
        protocol = self._site_protocol() if est.found and det_side < self.route and not sure else ""
        known = protocol == "near" or (protocol == "wide" and small_in_field)
        if sure or known:
            # the detector alone is conclusive (a disc this small is below `route` of any disc the model
            # draws), or the site's vote already says what the probe would
            seen, probes, model_side = None, 0, -1.0  # -1: not probed
            wide = sure or protocol == "wide"
        else:
            seen = self._look(probe, images, whole, h, full=True, first_pass=first_pass)
            probes = 1
            model_side = math.sqrt(seen.share / ref) if seen is not None else 0.0
            wide = est.found and small_in_field and det_side < self.route * model_side
        if seen is not None and not wide:  # on a wider field the model's disc is its training size
            self.shares = (self.shares + [seen.share])[-SITE_SHARES:]
        if wide or known:
            # the detector's blob is the disc's brightest part (near the cup); the model, trained on centred
            # discs, barely moves its disc off the crop's centre, so the crop must start centred on the disc
            cy, cx = disc_centre(images[0], est) if self.centre in ("disc", "rim") else (est.cy, est.cx)
            if self.centre == "rim":  # the rim's circle: about half disc_centre's offset (docs/geometry.md)
                cy, cx, _ = rim_centre(images[0], est, (cy, cx))
            box = self._box_at(cy, cx, est.share if wide else statistics.median(self.shares), h)
        elif seen is not None:
            box = self._box_at(seen.cy, seen.cx, seen.share, h)
        else:
            box = whole
        if known:  # counted by the final crop, below
            site_share = -1.0
        else:
            site_share = self._vote(not box.is_whole(h, w), wide)
            if not wide and site_share <= self.site_vote:  # weak evidence the site does not share: as it is
                box = whole
        refined = 0
        while refined < self.refine and not box.is_whole(h, w):
            disc = self._look(probe, images, box, h, first_pass=first_pass if self.reuse_settled else None)
            probes += 1
            if disc is None:  # the model sees nothing in the crop: the estimate was wrong, use the image as is
                box = whole
                break
            nxt = self._recentre(disc, box, h, keep_side=bool(self.probe_size) and self.probe_size != h)
            refined += 1
            settled = self._settled(nxt, box)
            if settled and self.reuse_settled:  # keep the probed crop: its pass becomes the step's first
                break
            box = nxt
            if settled or box.is_whole(h, w):
                break
        if known:  # cast now, revised by `apply` should its retry send the image back whole
            self._known_vote = (not box.is_whole(h, w), wide and not box.is_whole(h, w))
            site_share = self._vote(*self._known_vote)
        return box, est, {"geo_wide": float(wide), "geo_model_side": model_side, "geo_refined": float(refined),
                          "geo_site_share": site_share, "geo_site_known": float(known),
                          "geo_field": est.field, "geo_probes": float(probes)}

    def apply(self, step: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
              snapshot: Callable[[], object] | None = None, restore: Callable[[object], None] | None = None,
              probe: Callable[[torch.Tensor], torch.Tensor] | None = None,
              reused: Callable[[], int] | None = None,
              first_pass: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Run `step` (the adapter's adapt-and-predict on [1, 3, S, S] -> logits [1, 2, S, S]) on the
        disc's crop; returns logits in the original frame. probe: the model's forward with the
        adapter's current parameters (no adaptation, no statistics update) for placing the crop.
        first_pass: the same pass made so that the adapter's step can reuse it as its own first pass
        (used for the looks whose input may become the step's: the whole image, and refinements with
        reuse_settled); the step then gets that look's very input tensor. reused: the adapter's
        running count of passes so reused (diagnostic `geo_extra_passes`: probes that were not). snapshot/restore: the adapter's state,
        so a retry starts from where the wrong crop's step began."""
        if images.shape[0] != 1:  # one crop per image; batches go image by image
            outs, boxes = [], []
            for x in images:
                outs.append(self.apply(step, x[None], snapshot, restore, probe, reused, first_pass))
                boxes += self.boxes
            self.boxes = boxes
            return torch.cat(outs)
        _, _, h, w = images.shape
        self._probed, self._known_vote = None, None
        if not self.use_model:
            probe = None
        if probe is not None:
            box, est, extra = self.plan(images, probe, first_pass)
        else:
            est, extra = estimate_disc(images[0], self.reference), {}
            box = self.choose_box(est, h)
        claimed = reused() if reused is not None else 0
        if box.is_whole(h, w):
            logits = step(self._input(images, box))
            self.last = self._record(est, box, h, retried=False, extra=self._extra(extra, reused, claimed))
            return logits
        saved = snapshot() if (self.retry and snapshot is not None) else None
        logits = step(self._input(images, box))
        retried = False
        if self.retry:  # the adapter's own answer on the crop: a crop with no disc in it goes back to the image
            better = Box.whole(h, w) if probe is not None and predicted_disc(logits, box, h) is None else (
                self._check(logits, box, h) if probe is None else None)
            if better is not None and better != box:
                if restore is not None and saved is not None:
                    restore(saved)
                box, retried = better, True
                logits = step(images if box.is_whole(h, w) else _minmax(crop(images, box, h)))
                if box.is_whole(h, w) and self._known_vote:  # the image's vote follows its final crop
                    self._unvote(*self._known_vote)
        self.last = self._record(est, box, h, retried, self._extra(extra, reused, claimed))
        return logits if box.is_whole(h, w) else paste(logits, box, (h, w))

    @staticmethod
    def _extra(extra: dict[str, float], reused: Callable[[], int] | None, claimed: int) -> dict[str, float]:
        """The plan's diagnostics plus `geo_extra_passes`: its probes less the one the step reused."""
        if "geo_probes" not in extra or reused is None:
            return extra
        return {**extra, "geo_extra_passes": extra["geo_probes"] - (reused() - claimed)}

    def to_frame(self, probs: torch.Tensor | None) -> torch.Tensor | None:
        """Probabilities [B, C, s, s] the step made on the last call's crops -> the original frames
        (0 outside the crop); None stays None, as does anything not from that call."""
        if probs is None or probs.shape[0] != len(self.boxes):
            return None
        return torch.cat([p[None] if box.is_whole(n, n) else paste(p[None], box, (n, n), fill=0.0)
                          for p, (box, n) in zip(probs, self.boxes)])

    def logits_to_frame(self, logits: torch.Tensor, i: int) -> torch.Tensor:
        """Logits [C, s, s] the step made on image i's crop in the last call -> [C, H, W], its frame."""
        box, n = self.boxes[i]
        return logits if box.is_whole(n, n) else paste(logits[None], box, (n, n))[0]

    def _record(self, est: DiscEstimate, box: Box, size: int, retried: bool,
                extra: dict[str, float] | None = None) -> dict[str, float]:
        self.boxes = [(box, size)]
        return {"geo_found": float(est.found), "geo_cy": est.cy, "geo_cx": est.cx,
                "geo_share_ratio": est.share / self.reference["disc_share"], "geo_contrast": est.contrast,
                "geo_zoom": size / box.side, "geo_cropped": float(not box.is_whole(size, size)),
                "geo_retried": float(retried), **(extra or {})}


GEOMETRY_MODES = ("off", "auto")


def build_geometry(mode: str, reference: dict | None, **options) -> GeometryStep | None:
    """`geometry=off` -> None; `auto` -> a GeometryStep (needs the source's reference)."""
    if mode not in GEOMETRY_MODES:
        raise ValueError(f"geometry={mode!r}: choose one of {GEOMETRY_MODES}")
    if mode == "off":
        return None
    if not reference:
        raise ValueError("geometry='auto' needs the source's disc geometry (checkpoint metadata 'geometry': "
                         "grata.train_source writes it, and ensure_source adds it to an older checkpoint)")
    return GeometryStep(reference, **options)
