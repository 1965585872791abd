"""Label-free segmentation quality: what a site can tell about a prediction without its masks.

Two kinds of evidence, each a pure function of probabilities [2, H, W] (channel 0 disc, 1 cup):
  shape       anatomy a correct segmentation obeys: one compact, elliptical disc holding one cup,
              a cup-to-disc ratio in range, a disc whose size and place match the source's own;
  agreement   the prediction against references it did not make: the *source* model under photometric
              and scale perturbations, mapped back to the image's frame (`source_references`). Where
              the frozen source model cannot agree with itself once the image is perturbed, its
              decision boundary runs through this image, and so, usually, does the error.
`QualityModel` maps the features to an estimate of the image's mean Dice (0-100). It is fitted on the
source domain's own labelled training images under simulated acquisition shifts, when the source
model is trained, and stored with the checkpoint: no target label is ever used.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.optimize import nnls
from scipy.spatial import ConvexHull, QhullError

from grata.metrics import dice

STRUCTURES = ("disc", "cup")


# --- perturbations the source model is asked to agree across ------------------------------------------
def _zoom(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Zoom [B, C, H, W] about the centre: scale > 1 magnifies (crops), < 1 shrinks (pads with zeros)."""
    theta = torch.tensor([[1 / scale, 0.0, 0.0], [0.0, 1 / scale, 0.0]], dtype=x.dtype).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _photometric(x: torch.Tensor, gamma: float, gain: tuple[float, float, float]) -> torch.Tensor:
    g = torch.tensor(gain, dtype=x.dtype).view(1, 3, 1, 1)
    y = (x.clamp(0, 1) ** gamma) * g
    lo, hi = y.amin((1, 2, 3), keepdim=True), y.amax((1, 2, 3), keepdim=True)
    return (y - lo) / (hi - lo).clamp_min(1e-6)  # the pipeline's own per-image min-max


# (name, forward transform of the image, inverse transform of the prediction back to the image frame)
PERTURBATIONS = (
    ("zoom_in", lambda x: _zoom(x, 1.25), lambda p: _zoom(p, 1 / 1.25)),
    ("zoom_out", lambda x: _zoom(x, 0.8), lambda p: _zoom(p, 1 / 0.8)),
    ("dark", lambda x: _photometric(x, 1.8, (1.0, 1.0, 1.0)), lambda p: p),
    ("cast", lambda x: _photometric(x, 0.7, (1.2, 0.85, 0.7)), lambda p: p),
)


@torch.no_grad()
def source_references(predict, x: torch.Tensor) -> list[torch.Tensor]:
    """The source model's probabilities under each of PERTURBATIONS, mapped back to x's frame.

    predict: images [B, 3, H, W] -> logits [B, 2, H, W] (the frozen source model);
    x: [B, 3, H, W] -> list of len(PERTURBATIONS) probabilities [B, 2, H, W]. Zooming out loses the
    border, zooming in the frame's margin: those pixels are compared only where the view saw them
    (`_valid` marks them NaN).
    """
    refs = []
    for name, forward, inverse in PERTURBATIONS:
        probs = inverse(torch.sigmoid(predict(forward(x)).float()))
        if name == "zoom_in":  # outside the magnified window the view saw nothing
            seen = inverse(torch.ones_like(probs[:, :1])) > 0.99
            probs = torch.where(seen, probs, torch.full_like(probs, float("nan")))
        refs.append(probs)
    return refs


# --- features of one prediction -------------------------------------------------------------------------
def _components(mask: np.ndarray) -> tuple[int, float]:
    """(number of components, share of the largest) of a bool mask [H, W]."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return 0, 0.0
    sizes = np.bincount(labels.ravel())[1:]
    return n, float(sizes.max() / sizes.sum())


def ellipse_iou(mask: np.ndarray) -> float:
    """IoU of a bool mask [H, W] with the ellipse of the same first and second moments (1 = an ellipse)."""
    ys, xs = np.nonzero(mask)
    if len(ys) < 5:
        return 0.0
    cy, cx = ys.mean(), xs.mean()
    cov = np.cov(np.stack([ys - cy, xs - cx]))
    vals, vecs = np.linalg.eigh(cov)
    if vals.min() <= 1e-6:
        return 0.0
    yy, xx = np.mgrid[: mask.shape[0], : mask.shape[1]]
    d = np.stack([yy - cy, xx - cx], -1) @ vecs  # coordinates along the principal axes
    ellipse = (d[..., 0] ** 2 / (4 * vals[0]) + d[..., 1] ** 2 / (4 * vals[1])) <= 1.0
    inter = float((ellipse & mask).sum())
    return inter / float((ellipse | mask).sum())


def solidity(mask: np.ndarray) -> float:
    """Area over convex-hull area of a bool mask [H, W] (1 = convex; a crescent or two blobs score low)."""
    ys, xs = np.nonzero(mask)
    if len(ys) < 3:
        return 0.0
    try:
        hull = ConvexHull(np.stack([ys, xs], 1))
    except QhullError:  # all pixels on a line
        return 1.0
    # the hull runs through pixel centres: add half a pixel around its perimeter to compare with a pixel count
    return float(min(1.0, len(ys) / (hull.volume + hull.area / 2 + 1)))


def soft_dice(prob: torch.Tensor) -> float:
    """Expected Dice x100 of the hard mask under the model's own probabilities [H, W]: 100 for a
    confident prediction, lower the wider the band of uncertain pixels relative to the structure."""
    hard = (prob > 0.5).float()
    return float(100 * (2 * (prob * hard).sum() + 1e-6) / (prob.sum() + hard.sum() + 1e-6))


def agreement(prob: torch.Tensor, refs: list[torch.Tensor]) -> float:
    """Mean Dice x100 between the hard mask of prob [H, W] and each reference's [H, W] (NaN = unseen)."""
    hard = prob > 0.5
    out = []
    for ref in refs:
        seen = ~torch.isnan(ref)
        a, b = hard & seen, (ref > 0.5) & seen
        total = float(a.sum() + b.sum())
        out.append(100.0 if total == 0 else 200.0 * float((a & b).sum()) / total)
    return float(np.mean(out)) if out else float("nan")


def expected_dice(prob: torch.Tensor, refs: list[torch.Tensor]) -> float:
    """Expected Dice x100 of the hard mask of prob [H, W] if the truth were drawn pixel by pixel from the
    mean of the prediction and its references (NaN = unseen): low where the source model, perturbed,
    puts probability on other pixels than the prediction does."""
    hard = (prob > 0.5).float()
    mean = torch.nanmean(torch.stack([prob, *refs]), 0)
    return float(100 * (2 * (hard * mean).sum() + 1e-6) / (hard.sum() + mean.sum() + 1e-6))


def features(probs: torch.Tensor, refs: list[torch.Tensor] | None = None) -> dict[str, float]:
    """Label-free features of one prediction probs [2, H, W]; refs: source references [2, H, W] each."""
    h, w = probs.shape[-2:]
    disc, cup = (probs[0] > 0.5).numpy(), (probs[1] > 0.5).numpy()
    f: dict[str, float] = {}
    for name, mask, prob in (("disc", disc, probs[0]), ("cup", cup, probs[1])):
        n, largest = _components(mask)
        f[f"{name}_area"] = float(mask.mean())
        f[f"{name}_components"] = float(n)
        f[f"{name}_largest"] = largest
        f[f"{name}_ellipse"] = ellipse_iou(mask)
        f[f"{name}_solidity"] = solidity(mask)
        f[f"{name}_soft_dice"] = soft_dice(prob)
        if refs is not None:
            own = [r[STRUCTURES.index(name)] for r in refs]
            f[f"{name}_agreement"] = agreement(prob, own)
            f[f"{name}_expected"] = expected_dice(prob, own)
    f["cup_in_disc"] = float((cup & disc).sum() / cup.sum()) if cup.any() else 0.0
    rows_d, rows_c = np.nonzero(disc.any(1))[0], np.nonzero(cup.any(1))[0]
    f["cdr"] = float(len(rows_c) and (rows_c[-1] - rows_c[0] + 1) / (rows_d[-1] - rows_d[0] + 1)) if len(rows_d) else 0.0
    if disc.any():
        ys, xs = np.nonzero(disc)
        f["disc_offset"] = float(math.hypot(ys.mean() / h - 0.5, xs.mean() / w - 0.5))
    else:
        f["disc_offset"] = 0.5
    return f


def derived(f: dict[str, float]) -> dict[str, float]:
    """Composite signals of a feature dict: per-structure means and a 0-100 anatomical shape score."""
    out = {"agreement": (f.get("disc_agreement", np.nan) + f.get("cup_agreement", np.nan)) / 2,
           "expected": (f.get("disc_expected", np.nan) + f.get("cup_expected", np.nan)) / 2,
           "soft_dice": (f["disc_soft_dice"] + f["cup_soft_dice"]) / 2,
           "disc_fragments": math.log1p(max(f["disc_components"] - 1, 0)),
           "cup_fragments": math.log1p(max(f["cup_components"] - 1, 0))}
    out["shape"] = shape_score(f)
    return out


def shape_score(f: dict[str, float]) -> float:
    """0-100 anatomical plausibility of a feature dict (features()): an elliptical, solid, single disc with
    one solid cup inside it and a cup-to-disc ratio in range; 0 when the ratio is out of range or no cup."""
    cdr_ok = 1.0 if 0.1 <= f["cdr"] <= 0.9 else 0.0
    return 100 * (f["disc_ellipse"] * f["disc_solidity"] * f["cup_solidity"] * f["cup_in_disc"]
                  * f["disc_largest"] * f["cup_largest"] * cdr_ok) ** (1 / 6)


# What the calibrated estimate reads: per structure, the prediction's expected Dice under the source model's
# perturbed ensemble and its hard agreement with it. The study (docs/quality.md) measured the shape features
# too; a ridge over all 17 of them, fitted on the source's simulated shifts, ranked real targets worse
# (Spearman -0.10 to 0.49) than these four: what the simulated shifts teach about shape does not transfer.
FEATURES = ("disc_expected", "cup_expected", "disc_agreement", "cup_agreement")
# The estimate since version 2 (docs/quality.md): the mean over disc and cup of the expected Dice under the
# source model's perturbed ensemble, plus the source's own offset between true and expected Dice. Measured on
# the real targets, every ridge over the four signals fitted on simulated shifts (acquisition, and geometry:
# wider fields through the geometry step) ranked images worse than this one signal unfitted.
ESTIMATE = ("expected",)
QUALITY_VERSION = 2  # 1: ridge over FEATURES on acquisition shifts; 2: ESTIMATE + the source's offset


# --- the calibrated estimate --------------------------------------------------------------------------
@dataclass
class QualityModel:
    """Features -> estimated mean Dice (0-100): a non-negative ridge regression on standardised features.

    Stored with the checkpoint as a plain dict (`to_dict`), fitted by `fit` on source images only.
    """
    names: list[str]
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    info: dict = field(default_factory=dict)

    def predict(self, feats: dict[str, float]) -> float:
        feats = {**feats, **derived(feats)}
        x = np.array([feats.get(n, 0.0) for n in self.names], dtype=float)
        z = (x - np.array(self.mean)) / np.array(self.scale)
        return float(np.clip(z @ np.array(self.coef) + self.intercept, 0.0, 100.0))

    def to_dict(self) -> dict:
        return {"names": self.names, "mean": self.mean, "scale": self.scale, "coef": self.coef,
                "intercept": self.intercept, "info": self.info}

    @classmethod
    def constant(cls, value: float = 50.0) -> "QualityModel":
        """An estimate that ignores its features: for timing the monitor without a fitted model."""
        return cls(list(FEATURES), [0.0] * len(FEATURES), [1.0] * len(FEATURES), [0.0] * len(FEATURES), value)

    @classmethod
    def from_dict(cls, d: dict) -> "QualityModel":
        """A stored model, checked: it decides fallbacks and the guard, and it arrives with the model."""
        model = cls(**d)
        model.check()
        return model

    def check(self) -> None:
        """Refuse a model whose estimate could be NaN or whose size is unbounded: a NaN estimate silently
        switches the fallback and the guard off."""
        n = len(self.names)
        if n == 0 or n > 64 or not (len(self.mean) == len(self.scale) == len(self.coef) == n):
            raise ValueError(f"quality model: names, mean, scale and coef must have one equal length in 1..64 "
                             f"(got {n}, {len(self.mean)}, {len(self.scale)}, {len(self.coef)})")
        values = np.array([*self.mean, *self.scale, *self.coef, self.intercept], dtype=float)
        if not np.isfinite(values).all() or min(self.scale) <= 0:
            raise ValueError("quality model: every mean, scale, coef and the intercept must be finite, every scale > 0")
        version = quality_version(self.to_dict())
        if version > QUALITY_VERSION:
            raise ValueError(f"quality model version {version} is newer than this code's {QUALITY_VERSION}")

    @classmethod
    def fit(cls, rows: list[dict[str, float]], dice: list[float], names: list[str], alpha: float = 1.0) -> "QualityModel":
        rows = [{**r, **derived(r)} for r in rows]
        x = np.array([[r.get(n, 0.0) for n in names] for r in rows], dtype=float)
        y = np.asarray(dice, dtype=float)
        mean, scale = x.mean(0), x.std(0) + 1e-9
        z = (x - mean) / scale
        # every signal is "higher is better" by construction: a negative weight would only fit the collinearity
        # of the calibration shifts (measured: the synthetic source's unconstrained fit put -23 on cup_expected)
        coef, _ = nnls(np.vstack([z, math.sqrt(alpha) * np.eye(len(names))]),
                       np.concatenate([y - y.mean(), np.zeros(len(names))]))
        return cls(names, mean.tolist(), scale.tolist(), coef.tolist(), float(y.mean()), {"samples": len(y)})


# --- fitting at source-training time --------------------------------------------------------------------
def simulate_shift(x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random acquisition and crop shift of labelled source images x [B,3,H,W], masks y [B,2,H,W].

    Colour cast, gamma, contrast, blur, noise and an illumination gradient change the image only;
    zoom and translation (another crop protocol) move image and mask together. Strengths reach
    well past the source's own variation so the fit sees failures, not just successes.
    """
    b = x.shape[0]
    u = lambda lo, hi, *shape: lo + (hi - lo) * torch.rand(*(shape or (b,)), generator=g)  # noqa: E731
    scale = torch.exp(u(math.log(0.6), math.log(1.5)))
    shift = u(-0.25, 0.25, b, 2)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = (F.grid_sample(y, grid, mode="bilinear", padding_mode="zeros", align_corners=False) > 0.5).float()
    gains = torch.exp(u(-0.5, 0.5, b, 3, 1, 1))
    x = x.clamp(0, 1) ** torch.exp(u(-0.8, 0.8)).view(b, 1, 1, 1) * gains
    contrast = u(0.3, 1.3).view(b, 1, 1, 1)
    x = (x - x.mean((1, 2, 3), keepdim=True)) * contrast + x.mean((1, 2, 3), keepdim=True)
    ramp = torch.linspace(-1, 1, x.shape[-1]).view(1, 1, 1, -1) * u(-0.6, 0.6).view(b, 1, 1, 1)
    x = x * (1 + ramp)
    sigma = u(0.0, 3.0)
    for i in range(b):
        if sigma[i] > 0.3:
            k = max(1, int(3 * sigma[i]))
            t = torch.arange(-k, k + 1, dtype=x.dtype)
            w = torch.exp(-0.5 * (t / sigma[i]) ** 2)
            w = (w / w.sum()).repeat(3, 1)
            xi = F.conv2d(F.pad(x[i : i + 1], (k, k, 0, 0), mode="replicate"), w[:, None, None, :], groups=3)
            x[i : i + 1] = F.conv2d(F.pad(xi, (0, 0, k, k), mode="replicate"), w[:, None, :, None], groups=3)
    x = x + u(0.0, 0.08).view(b, 1, 1, 1) * torch.randn(x.shape, generator=g)
    lo, hi = x.amin((1, 2, 3), keepdim=True), x.amax((1, 2, 3), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-6), y


@torch.no_grad()
def calibration_rows(predict, images: torch.Tensor, masks: torch.Tensor, copies: int = 3, seed: int = 0
                     ) -> list[dict[str, float]]:
    """Features and true mean Dice of the source model on its own labelled images under simulated shifts.

    predict: the frozen source model (images -> logits); images [N,3,H,W], masks [N,2,H,W];
    each image is seen once as it is and `copies` times shifted. Returns rows with key "dice".
    """
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(len(images)):
        x, y = images[i : i + 1], masks[i : i + 1]
        for c in range(copies + 1):
            xs, ys = (x, y) if c == 0 else simulate_shift(x, y, g)
            probs = torch.sigmoid(predict(xs).float())
            refs = [r[0] for r in source_references(predict, xs)]
            rows.append({**features(probs[0], refs), "dice": float(dice(probs > 0.5, ys).mean())})
    return rows


class QualityMonitor:
    """Scores a stream's predictions, image by image, against the frozen source model.

    model: the source model (copied, frozen, eval-mode BN: its running statistics); quality: the
    checkpoint's fitted QualityModel; plan: the adapter's precision and layout.
    """

    def __init__(self, model: torch.nn.Module, quality: QualityModel | dict, plan) -> None:
        self.quality = quality if isinstance(quality, QualityModel) else QualityModel.from_dict(quality)
        self.plan = plan
        self.last_features: dict[str, list[dict[str, float]]] = {}  # per image, set by Adapter._decide: for studies
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        plan.prepare(self.model)

    @torch.no_grad()
    def source_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The unadapted source model's logits: x [B,3,H,W] -> [B,2,H,W] fp32."""
        with self.plan.autocast(grad=False):
            return self.model(self.plan.layout(x)).float()

    @torch.no_grad()
    def crop_features(self, x: torch.Tensor, logits: torch.Tensor
                      ) -> tuple[list[dict[str, float]], list[dict[str, float]], torch.Tensor]:
        """On the step's input x [B,3,H,W] (the crop, with the geometry step): the features of `logits`
        [B,2,H,W] and of the source model's prediction, per image, and the source's logits."""
        src = self.source_logits(x)
        refs = source_references(self.source_logits, x)
        feats = [[features(torch.sigmoid(lg[b].float()).cpu(), [r[b].cpu() for r in refs]) for b in range(x.shape[0])]
                 for lg in (logits, src)]
        return feats[0], feats[1], src



def fit_quality(model: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor, limit: int = 80,
                copies: int = 0, seed: int = 0) -> dict:
    """The QualityModel kept in the checkpoint under "quality" (version QUALITY_VERSION), from the source's
    own labelled images (at most `limit`): ESTIMATE, shifted by the median of (true - expected) Dice on
    those images as they are, so that its level is the source model's Dice on its own domain. `copies`
    simulated shifts of each image are scored too, only to record the fit's rank correlation on them."""
    from scipy.stats import spearmanr

    from grata.speed import Plan, Speed  # the fast path's precision, as the sites will run it

    plan = Plan.resolve(Speed.named("fast"), torch.device("cpu"))
    monitor = QualityMonitor(model, QualityModel.constant(0.0), plan)
    idx = torch.linspace(0, len(images) - 1, min(limit, len(images))).round().long()
    rows = calibration_rows(monitor.source_logits, images[idx], masks[idx], copies=copies, seed=seed)
    signal = np.array([derived(r)["expected"] for r in rows])
    truth = np.array([r["dice"] for r in rows])
    plain = np.arange(len(rows)) % (copies + 1) == 0  # each image as it is
    if not plain.any():
        raise ValueError(f"fit_quality: no labelled source image to fit on (images {len(images)}, limit {limit})")
    offset = float(np.median(truth[plain] - signal[plain]))
    if not math.isfinite(offset):
        raise ValueError("fit_quality: the source's offset between true and expected Dice is not finite")
    info = {"images": len(idx), "copies": copies, "seed": seed, "version": QUALITY_VERSION,
            "dice_mean": float(truth[plain].mean()), "expected_mean": float(signal[plain].mean())}
    if copies and np.ptp(signal) > 0:
        info["shifted_spearman"] = float(spearmanr(signal, truth)[0])
    return QualityModel(list(ESTIMATE), [0.0], [1.0], [1.0], offset, info).to_dict()


def quality_version(quality: dict | None) -> int:
    """The version of a checkpoint's stored quality model: 0 none; 1 fitted by fit_quality before
    versions were recorded; a model written by hand (no fit record in its info) is taken as current,
    it is its author's to keep."""
    if not quality:
        return 0
    info = quality.get("info", {})
    return int(info.get("version", 1 if "images" in info else QUALITY_VERSION))


# --- the crop against the frame: is the disc where, and as large as, the frame says? ------------------------
def _disc_blob(prob: torch.Tensor) -> np.ndarray:
    """The largest connected component of a disc probability map [H, W] > 0.5, as a bool mask."""
    mask = (prob > 0.5).numpy()
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == int(sizes.argmax()) + 1


def _centre(mask: np.ndarray) -> tuple[float, float, float]:
    """(cy, cx, equivalent radius) of a bool mask [H, W] as fractions of its side (radius 0: empty)."""
    if not mask.any():
        return 0.5, 0.5, 0.0
    ys, xs = np.nonzero(mask)
    s = mask.shape[0]
    return (ys.mean() + 0.5) / s, (xs.mean() + 0.5) / s, math.sqrt(mask.mean() / math.pi)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


def frame_features(disc_prob: torch.Tensor, box: tuple[int, int, int] | None, probe_disc: torch.Tensor | None,
                   detector: tuple[float, float, float] | None) -> dict[str, float]:
    """Label-free consistency of a prediction's disc with the frame it was cut from.

    disc_prob: the returned disc probabilities in the original frame [S, S]; box: (y0, x0, side) of the
    crop it was segmented on (None: the whole frame); probe_disc: the source model's disc probabilities
    on the whole frame [S, S] (None: not available); detector: the classical detector's disc
    (cy, cx, radius) as fractions of the side (grata.geometry.estimate_disc), None if it found none.
    Returns, with "geo_" keys:
      crop_offset  distance of the disc's centre from the crop's centre / crop side (a misplaced crop
                   shows the disc off-centre: the model was trained on disc-centred crops);
      crop_edge    share of the crop's border the disc touches (a disc cut by the crop);
      crop_share   the disc's share of the crop (the source's is geometry_reference's disc_share);
      det_scale    |log(predicted / detector disc radius)|, det_shift the centres' distance / detector
                   radius, det_iou the IoU with the detector's circle (2, 2, 0 without a detector disc);
      probe_*      the same against the source model's whole-frame disc.
    """
    s = disc_prob.shape[-1]
    blob = _disc_blob(disc_prob.float().cpu())
    cy, cx, r = _centre(blob)
    f: dict[str, float] = {"geo_pred_radius": r}
    y0, x0, side = box if box is not None else (0, 0, s)
    ccy, ccx = (y0 + side / 2) / s, (x0 + side / 2) / s
    f["geo_crop_offset"] = math.hypot(cy - ccy, cx - ccx) * s / side if blob.any() else 0.5
    f["geo_crop_share"] = r * r * math.pi * (s / side) ** 2
    # the disc's pixels on the crop's border rows and columns, inside the frame
    ys0, ys1, xs0, xs1 = max(y0, 0), min(y0 + side, s) - 1, max(x0, 0), min(x0 + side, s) - 1
    border = np.concatenate([blob[ys0, xs0:xs1 + 1], blob[ys1, xs0:xs1 + 1], blob[ys0:ys1 + 1, xs0], blob[ys0:ys1 + 1, xs1]])
    f["geo_crop_edge"] = float(border.mean()) if border.size else 0.0
    yy, xx = (np.mgrid[:s, :s] + 0.5) / s
    probe_blob = None if probe_disc is None else _disc_blob(probe_disc.float().cpu())
    for name, other in (("det", detector), ("probe", None if probe_blob is None else _centre(probe_blob))):
        if other is None or other[2] <= 0 or not blob.any():
            f[f"geo_{name}_scale"], f[f"geo_{name}_shift"], f[f"geo_{name}_iou"] = 2.0, 2.0, 0.0
            continue
        oy, ox, orad = other
        f[f"geo_{name}_scale"] = abs(math.log(r / orad))
        f[f"geo_{name}_shift"] = math.hypot(cy - oy, cx - ox) / orad
        circle = ((yy - oy) ** 2 + (xx - ox) ** 2) <= orad ** 2
        f[f"geo_{name}_iou"] = _iou(blob, circle if name == "det" else probe_blob)
    return f
