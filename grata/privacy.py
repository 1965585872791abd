"""Differentially private release of what a site shares: its batch-norm input statistics and its
per-image scalars (the Dice proxy), all under one accountant per site (grata/ledger.py).

Unit of privacy: one image. Adjacency: two streams that differ in one image, replaced (a site's image
count and its chunking are the site's own choice and treated as public). A patient with k images is
protected at group level k: (k * epsilon, k * exp((k - 1) * epsilon) * delta) at most.

BN statistics, sensitivity true by construction. The released moments come from a separate no-grad
pass of the frozen source model (`SourcePass`), public to every participant, with every BN layer in
eval mode: a layer's input is then a function of that one image alone, never of other images, of the
adaptation state, of `bn=auto`, of the guard or of the optimizer. Per image and layer l with C_l
channels, relative to the source's running statistics (mu, var):
  u = (m1 - mu) / sqrt(var + eps)           m1: the image's channel mean of the layer input
  v = log((m2 + eps) / (var + mu^2 + eps))  m2: its channel second moment
Each layer's [u, v] is clipped to clip / sqrt(L), so one image's vector has L2 norm <= clip and one
replaced image moves the summed release by at most 2 * clip (L2).

Per-image scalars (`PrivateScalars`): each image's value is clipped to declared bounds [lo, hi] and
summed. When a value is computed from that image alone (`stream_dependent=False`), one replaced image
moves the sum by at most hi - lo. Values from the adapting model (the Dice proxy, the alignment
cosine) depend on every earlier image through the adaptation state, so one image can move every
later value: then the honest sensitivity of the round's mean is the whole range hi - lo.

Noise: OpenDP's Gaussian mechanism (a CSPRNG and floating-point-safe sampling), never torch's or
numpy's generators: nothing the coordinator knows (a run seed, a torch seed) reproduces it.
Accounting: every Gaussian release is one step with its own noise multiplier (std / sensitivity) in
one Opacus accountant (RDP by default), so the fields of a round compose as what they are.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from opacus.accountants.utils import get_noise_multiplier

EPS = 1e-5
ACCOUNTANTS = ("rdp", "prv")

# Declared bounds of the per-image scalars a private site may release, and whether each image's value
# depends on the other images (through the adaptation state). Only dice_proxy leaves in private runs.
SCALAR_FIELDS: dict[str, tuple[float, float, bool]] = {
    "dice_proxy": (0.0, 100.0, True),
}


# --- noise ------------------------------------------------------------------------------------------
def _opendp():
    import opendp.prelude as dp  # imported on first use: an optional-feature switch is process-wide

    dp.enable_features("contrib")
    return dp


def gaussian(values: torch.Tensor, std: float) -> torch.Tensor:
    """values [N] + independent N(0, std^2) noise from OpenDP's CSPRNG-backed sampler; float64 [N]."""
    if not std > 0:
        raise ValueError(f"noise std must be > 0, got {std}")
    dp = _opendp()
    flat = values.detach().double().flatten()
    mechanism = dp.m.make_gaussian(dp.vector_domain(dp.atom_domain(T=float, nan=False)),
                                   dp.l2_distance(T=float), scale=float(std))
    return torch.tensor(np.asarray(mechanism(flat.tolist()), dtype=np.float64)).reshape(values.shape)


def calibrate(epsilon: float, delta: float, releases: int, accountant: str = "rdp") -> float:
    """The effective Gaussian noise multiplier that spends (epsilon, delta) over `releases` rounds."""
    if epsilon <= 0 or not 0 < delta < 1 or releases < 1:
        raise ValueError(f"privacy: need epsilon > 0, 0 < delta < 1, releases >= 1 (got {epsilon}, {delta}, {releases})")
    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=1.0,
                                      steps=releases, accountant=accountant))


def split(sigma: float, shares: dict[str, float]) -> dict[str, float]:
    """Per-field noise multipliers whose Gaussian releases together cost what one release at `sigma`
    costs: with sample rate 1 the Renyi divergences add, sum_i 1/sigma_i^2 = 1/sigma^2, so field i
    gets sigma / sqrt(share_i). shares: field -> share of the round's budget, summing to 1."""
    total = sum(shares.values())
    if not shares or any(s <= 0 for s in shares.values()) or not math.isclose(total, 1.0, rel_tol=1e-9):
        raise ValueError(f"privacy: budget shares must be > 0 and sum to 1, got {shares}")
    return {name: sigma / math.sqrt(share) for name, share in shares.items()}


# --- the source pass --------------------------------------------------------------------------------
class SourcePass:
    """Per-image BN input moments of the frozen source model: the released statistics' only input.

    A private copy in eval mode (running statistics: no layer mixes images), no gradients, never
    adapted. `moments(x)` for x [B, 3, H, W] returns per BN layer (m1 [B, C], m2 [B, C]), fp32.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = copy.deepcopy(model).float().eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.norms = [m for m in self.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        self._seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._wanted = len(self.norms)
        for layer in self.norms:
            layer.register_forward_pre_hook(self._hook)

    def _hook(self, _module, inputs) -> None:
        x = inputs[0].float()
        self._seen.append((x.mean((2, 3)), (x * x).mean((2, 3))))
        if len(self._seen) == self._wanted:
            raise _EnoughLayers  # the rest of the network would compute nothing anyone reads

    def refs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return source_moments(self.norms)

    @torch.no_grad()
    def moments(self, x: torch.Tensor, first: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every BN layer's input moments, in the order the forward meets them; first=k: only the first
        k layers', and the forward stops there (fed_kin reads the stem's alone)."""
        self._seen, self._wanted = [], first or len(self.norms)
        try:
            self.model(x.float())
        except _EnoughLayers:
            pass
        seen, self._seen = self._seen, []
        if len(seen) != self._wanted:
            raise RuntimeError(f"source pass saw {len(seen)} BN inputs, expected {self._wanted} of its "
                               f"{len(self.norms)} BN layers")
        return seen


class _EnoughLayers(Exception):
    """Raised inside a SourcePass forward once the moments asked for are seen."""


def source_moments(norms) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The public reference of every BN layer: (running mean, running var), each [C_l]."""
    return [(n.running_mean.detach().clone().float(), n.running_var.detach().clone().float()) for n in norms]


def to_relative(m1: torch.Tensor, m2: torch.Tensor, ref: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Per-image moments [B, C] -> source-relative [B, 2C] (u then v)."""
    mu, var = ref
    u = (m1 - mu) / torch.sqrt(var + EPS)
    v = torch.log((m2.clamp_min(0) + EPS) / (var + mu**2 + EPS))
    return torch.cat([u, v], dim=1)


def from_relative(z: torch.Tensor, ref: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Source-relative [2C] -> (m1, m2), each [C]; the inverse of to_relative for one vector."""
    mu, var = ref
    u, v = z.chunk(2)
    m1 = mu + u * torch.sqrt(var + EPS)
    m2 = torch.exp(v) * (var + mu**2 + EPS) - EPS
    return m1, torch.maximum(m2, m1**2)  # a second moment is never below the squared mean


def clip_relative(z: torch.Tensor, bound: float) -> torch.Tensor:
    """Rows of z [B, D] scaled down to L2 norm <= bound."""
    return z * (bound / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)


# --- accumulators -----------------------------------------------------------------------------------
@dataclass
class PrivateMoments:
    """A round's clipped sum of source-relative moments; `release` adds the noise.

    refs: per layer (mu [C], var [C]); clip: per-image L2 bound; noise_multiplier: std / (2 clip).
    """
    refs: list[tuple[torch.Tensor, torch.Tensor]]
    clip: float
    noise_multiplier: float
    sums: list[torch.Tensor] = field(init=False)
    count: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.clip <= 0 or self.noise_multiplier <= 0:
            raise ValueError(f"privacy: clip ({self.clip}) and noise multiplier ({self.noise_multiplier}) must be > 0")
        self.reset()

    @property
    def sensitivity(self) -> float:
        return 2 * self.clip  # one image replaced: its clipped vector out, another in

    @property
    def noise_std(self) -> float:
        """Per-coordinate standard deviation of the noise on every released sum."""
        return self.noise_multiplier * self.sensitivity

    def add(self, moments: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Fold per-layer source-pass moments [(m1 [B, C], m2 [B, C]), ...] in, each image clipped."""
        if len(moments) != len(self.refs):
            raise ValueError(f"expected moments of {len(self.refs)} BN layers, got {len(moments)}")
        bound = self.clip / math.sqrt(len(self.refs))
        for i, ((m1, m2), ref) in enumerate(zip(moments, self.refs)):
            self.sums[i] += clip_relative(to_relative(m1.float(), m2.float(), ref), bound).double().sum(0)
        self.count += moments[0][0].shape[0]

    def release(self) -> tuple[list[torch.Tensor], int]:
        """The noisy per-layer sums (one joint Gaussian draw) and the image count; resets the sums."""
        flat = gaussian(torch.cat(self.sums), self.noise_std)
        noisy = list(flat.split([s.numel() for s in self.sums]))
        count = self.count
        self.reset()
        return [n.float() for n in noisy], count

    def reset(self) -> None:
        self.sums = [torch.zeros(2 * mu.numel(), dtype=torch.float64) for mu, _ in self.refs]
        self.count = 0


@dataclass
class PrivateScalars:
    """A round's per-image scalars, each clipped to its declared bounds (SCALAR_FIELDS by default).

    `release` returns each field's noisy mean with the noise's std on that mean; noise_multipliers
    maps a field to std / sensitivity of its sum.
    """
    noise_multipliers: dict[str, float]
    bounds: dict[str, tuple[float, float, bool]] = field(default_factory=lambda: dict(SCALAR_FIELDS))
    values: dict[str, list[float]] = field(init=False)

    def __post_init__(self) -> None:
        unknown = set(self.noise_multipliers) - set(self.bounds)
        if unknown:
            raise ValueError(f"privacy: no declared bounds for {sorted(unknown)}")
        self.values = {k: [] for k in self.noise_multipliers}

    def add(self, name: str, value: float) -> None:
        lo, hi, _ = self.bounds[name]
        self.values[name].append(min(max(float(value), lo), hi) if math.isfinite(value) else lo)

    def sensitivity(self, name: str, count: int) -> float:
        """L1 = L2 sensitivity of the field's sum over `count` images, one image replaced."""
        lo, hi, dependent = self.bounds[name]
        return (hi - lo) * (count if dependent else 1)

    def release(self) -> dict[str, tuple[float, float]]:
        """field -> (noisy mean, std of its noise); fields without values are left out. Resets."""
        out = {}
        for name, vals in self.values.items():
            if vals:
                std = self.noise_multipliers[name] * self.sensitivity(name, len(vals))
                noisy = float(gaussian(torch.tensor([sum(vals)], dtype=torch.float64), std)[0])
                out[name] = (noisy / len(vals), std / len(vals))
        self.values = {k: [] for k in self.noise_multipliers}
        return out


# --- pooling at the coordinator ---------------------------------------------------------------------
AGGREGATIONS = ("mean", "median", "trimmed_mean")


def robust_mean(rows: torch.Tensor, how: str, trim: float = 0.2, weights: torch.Tensor | None = None) -> torch.Tensor:
    """rows [S, D] -> [D]: `mean` (weighted by weights [S] when given), coordinate-wise `median`, or
    `trimmed_mean` (drops floor(trim * S) rows at each end of every coordinate)."""
    if how == "mean":
        w = torch.ones(rows.shape[0], dtype=rows.dtype) if weights is None else weights.to(rows.dtype)
        return (w[:, None] * rows).sum(0) / w.sum()
    if how == "median":
        return torch.quantile(rows, 0.5, dim=0)  # the middle two averaged when S is even
    if how == "trimmed_mean":
        k = int(math.floor(trim * rows.shape[0]))
        kept = rows.sort(0).values[k:rows.shape[0] - k]
        return kept.mean(0)
    raise ValueError(f"aggregation={how!r}: choose one of {AGGREGATIONS}")


def pool(releases: list[tuple[list[torch.Tensor], int, float]], refs: list[tuple[torch.Tensor, torch.Tensor]],
         sites: list[str] | None = None, aggregation: str = "mean", trim: float = 0.2
         ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[float]]:
    """Pool released sums from sites and rounds into one set of target statistics.

    releases: (per-layer noisy sums [2C_l], image count, noise std) for each release; sites: the site
    of each release (needed for the robust aggregations, which give every site one vote).
    Returns per layer (m1 [C], m2 [C]) and the per-layer shrinkage kept (1 = all signal, 0 = source).
    Each layer's pooled mean is shrunk towards the source statistics by the share of its spread that
    the known noise explains (a James-Stein style estimate): where privacy noise dominates, the
    pooled statistics fall back to the source's instead of injecting noise into every site.
    """
    if not releases:
        raise ValueError("pool needs at least one release")
    if aggregation == "mean":
        total = sum(n for _, n, _ in releases)
        noise_var = sum(std**2 for _, _, std in releases) / total**2  # of each coordinate of the mean
        means = [sum(sums[i].double() for sums, _, _ in releases) / total for i in range(len(refs))]
    else:
        if sites is None or len(sites) != len(releases):
            raise ValueError("robust pooling needs the site of every release")
        per_site: dict[str, list[int]] = {}
        for j, s in enumerate(sites):
            per_site.setdefault(s, []).append(j)
        site_noise = []
        means = [[] for _ in refs]
        for idx in per_site.values():
            n = sum(releases[j][1] for j in idx)
            site_noise.append(sum(releases[j][2] ** 2 for j in idx) / n**2)
            for i in range(len(refs)):
                means[i].append(sum(releases[j][0][i].double() for j in idx) / n)
        means = [robust_mean(torch.stack(m), aggregation, trim) for m in means]
        noise_var = sum(site_noise) / len(site_noise) ** 2  # of the plain mean of the site means; a guide
    pooled, kept = [], []
    for mean, ref in zip(means, refs):
        keep = max(0.0, 1.0 - noise_var / max(float((mean**2).mean()), 1e-12))
        pooled.append(from_relative((keep * mean).float(), ref))
        kept.append(keep)
    return pooled, kept


__all__ = ["AGGREGATIONS", "ACCOUNTANTS", "SCALAR_FIELDS", "PrivateMoments", "PrivateScalars", "SourcePass",
           "calibrate", "clip_relative", "from_relative", "gaussian", "pool", "robust_mean", "source_moments",
           "split", "to_relative"]
