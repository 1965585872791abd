"""Differentially private release of a site's batch-norm input statistics, and their pooling.

What a site releases, per BN layer l with C_l channels, is a sum over the round's images of
  u = (m1 - mu) / sqrt(var + eps)         m1: the image's channel mean of the layer input
  v = log((m2 + eps) / (var + mu^2 + eps))  m2: its channel second moment
where (mu, var) are the source model's running statistics, public to every participant. Working in
these source-relative units makes one clip norm meaningful for every layer. Each image's [u, v] of
layer l is clipped to clip / sqrt(L), so one image moves the whole release by at most `clip` (L2).

Adjacency: two streams differing in one image, replaced (the per-round image count is fixed by the
configuration and is public). The sum's L2 sensitivity is therefore 2 * clip, and Gaussian noise of
standard deviation noise_multiplier * 2 * clip is added to every coordinate. The noise multiplier is
calibrated with Opacus's accountant for the run's planned number of releases (sample rate 1, every
image is in every release of its round) to a target (epsilon, delta); each release is accounted.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

EPS = 1e-5
ACCOUNTANTS = ("rdp", "prv")


def source_moments(norms) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The public reference of every BN layer: (running mean, running var), each [C_l]."""
    return [(n.running_mean.detach().clone(), n.running_var.detach().clone()) for n in norms]


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


def calibrate(epsilon: float, delta: float, releases: int, accountant: str = "rdp") -> float:
    """The Gaussian noise multiplier that spends (epsilon, delta) over `releases` full-batch releases."""
    if epsilon <= 0 or not 0 < delta < 1 or releases < 1:
        raise ValueError(f"privacy: need epsilon > 0, 0 < delta < 1, releases >= 1 (got {epsilon}, {delta}, {releases})")
    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=1.0,
                                      steps=releases, accountant=accountant))


@dataclass
class PrivateMoments:
    """One site's accumulator and accountant. Feed it every adapted image's BN input moments with
    `add`; `release` returns the noisy per-layer sums and accounts the release.

    refs: per layer (mu [C], var [C]); clip: per-image L2 bound; noise_multiplier from `calibrate`.
    """
    refs: list[tuple[torch.Tensor, torch.Tensor]]
    clip: float
    noise_multiplier: float
    epsilon: float
    delta: float
    accountant: str = "rdp"
    history: list = field(default_factory=list)  # the accountant's, persisted with the site
    sums: list[torch.Tensor] = field(init=False)
    count: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.clip <= 0 or self.noise_multiplier <= 0:
            raise ValueError(f"privacy: clip ({self.clip}) and noise multiplier ({self.noise_multiplier}) must be > 0")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"privacy.accountant={self.accountant!r}: choose one of {ACCOUNTANTS}")
        self.sums = [torch.zeros(2 * mu.numel()) for mu, _ in self.refs]

    @property
    def noise_std(self) -> float:
        """Per-coordinate standard deviation of the noise on every released sum."""
        return self.noise_multiplier * 2 * self.clip

    def _accountant(self):
        acc = create_accountant(self.accountant)
        acc.history = copy.deepcopy(self.history)
        return acc

    def spent(self) -> float:
        """Epsilon spent so far at this delta (0 before the first release)."""
        return float(self._accountant().get_epsilon(self.delta)) if self.history else 0.0

    def would_spend(self) -> float:
        acc = self._accountant()
        acc.step(noise_multiplier=self.noise_multiplier, sample_rate=1.0)
        return float(acc.get_epsilon(self.delta))

    def add(self, moments: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Fold a batch's per-layer moments [(m1 [B, C], m2 [B, C]), ...] in, each image clipped."""
        if len(moments) != len(self.refs):
            raise ValueError(f"expected moments of {len(self.refs)} BN layers, got {len(moments)}")
        bound = self.clip / math.sqrt(len(self.refs))
        for i, ((m1, m2), ref) in enumerate(zip(moments, self.refs)):
            z = to_relative(m1.float(), m2.float(), ref)  # [B, 2C]
            scale = (bound / z.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
            self.sums[i] += (z * scale[:, None]).sum(0)
        self.count += moments[0][0].shape[0]

    def release(self, generator: torch.Generator) -> tuple[list[torch.Tensor], int] | None:
        """The noisy sums and the image count, or None (nothing released, nothing accounted) when the
        release would spend more than the budget or there is nothing to release. Resets the sums."""
        if self.count == 0 or self.would_spend() > self.epsilon * (1 + 1e-9):
            self.reset_sums()
            return None
        noisy = [s + self.noise_std * torch.randn(s.shape, generator=generator) for s in self.sums]
        acc = self._accountant()
        acc.step(noise_multiplier=self.noise_multiplier, sample_rate=1.0)
        self.history = acc.history
        count = self.count
        self.reset_sums()
        return noisy, count

    def reset_sums(self) -> None:
        self.sums = [torch.zeros_like(s) for s in self.sums]
        self.count = 0


def pool(releases: list[tuple[list[torch.Tensor], int, float]], refs: list[tuple[torch.Tensor, torch.Tensor]]
         ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[float]]:
    """Pool released sums from sites and rounds into one set of target statistics.

    releases: (per-layer noisy sums [2C_l], image count, noise std) for each release.
    Returns per layer (m1 [C], m2 [C]) and the per-layer shrinkage kept (1 = all signal, 0 = source).
    Each layer's pooled mean is shrunk towards the source statistics by the share of its spread that
    the known noise explains (a James-Stein style estimate): where privacy noise dominates, the
    pooled statistics fall back to the source's instead of injecting noise into every site.
    """
    if not releases:
        raise ValueError("pool needs at least one release")
    total = sum(n for _, n, _ in releases)
    noise_var = sum(std**2 for _, _, std in releases) / total**2  # of each coordinate of the mean
    pooled, kept = [], []
    for i, ref in enumerate(refs):
        mean = sum(sums[i] for sums, _, _ in releases) / total
        keep = max(0.0, 1.0 - noise_var / max(float((mean**2).mean()), 1e-12))
        pooled.append(from_relative(keep * mean, ref))
        kept.append(keep)
    return pooled, kept


__all__ = ["PrivateMoments", "calibrate", "pool", "source_moments", "to_relative", "from_relative"]
