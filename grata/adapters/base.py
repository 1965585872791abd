"""The one base class every test-time adapter builds on.

It owns model configuration (BN statistics policy, which parameters train), parameter collection,
reset to the source state and the adapt-and-predict loop. A method only implements `step`.
"""
from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from grata.augment import invert_views, weak_views
from grata.geometry import SITE_SHARES, build_geometry
from grata.norm import AdaptiveNorm, StatsPolicy, convert_norms, gaussian_shift, norm_layers
from grata.quality import QualityMonitor
from grata.speed import Plan, Speed


@torch.no_grad()
def stem_shifts(model: nn.Module, images: torch.Tensor) -> list[float]:
    """Each image's stem-BN shift from the source statistics: images [N, 3, H, W] -> N floats."""
    probe = convert_norms(copy.deepcopy(model), StatsPolicy.named("source")).eval()
    stem = norm_layers(probe)[0]
    shifts = []
    for x in images.split(1):
        stem.observe_next = True
        probe(x)
        shifts.append(stem.last_shift)
    return shifts


def shift_reference(model: nn.Module, images: torch.Tensor) -> float:
    """The source domain's own mean per-image stem shift: the unit `bn="auto"` measures sites in.

    images: the source's training images [N, 3, H, W]; run once at the end of source training.
    """
    shifts = stem_shifts(model, images)
    return float(sum(shifts) / len(shifts))


class Adapter:
    name = "base"
    default_bn = "image"
    trains = True  # False: no parameter is ever updated

    def __init__(self, model: nn.Module, lr: float = 1e-4, bn: str | StatsPolicy | None = None,
                 bn_source_weight: float = 0.5, site_momentum: float = 0.0, seed: int = 0,
                 ensemble: bool = False, shift_reference: float | None = None,
                 shift_threshold: float = 10.0, auto_warmup: int = 4,
                 quality: dict | None = None, fallback: bool = False, fallback_margin: float = 0.0,
                 guard: float = 0.0, guard_warmup: int = 8,
                 speed: str | Speed | dict = "fast", device: str = "cpu",
                 geometry: str = "off", geometry_reference: dict | None = None) -> None:
        """quality: the checkpoint's fitted QualityModel (grata.quality); with it every prediction gets a
        label-free Dice estimate (last_step["quality"]). fallback: per image, the source model's
        prediction replaces the adapted one when its estimate is ahead by more than fallback_margin.
        guard: points of smoothed estimated gain over the source (or, without a quality model, of
        the method's own proxy) below its best at which the adapted parameters go back to the source.
        geometry: "auto" segments a crop with the disc at the source's scale and maps it back
        (grata/geometry.py; geometry_reference: the checkpoint's "geometry")."""
        if lr < 0:
            raise ValueError(f"lr={lr} must be >= 0")
        if guard < 0:
            raise ValueError(f"guard={guard} must be >= 0 (0 = off)")
        if fallback and not quality:
            raise ValueError("fallback=True needs the checkpoint's quality model (quality=, written by grata.train_source)")
        bn = self.default_bn if bn is None else bn
        self.auto = bn == "auto"
        if self.auto and not (shift_reference and shift_reference > 0):
            raise ValueError("bn='auto' needs shift_reference (the source's own shift, stored in the checkpoint by "
                             "grata.train_source); re-run train_source on the checkpoint to add it")
        self.shift_reference, self.shift_threshold, self.auto_warmup = shift_reference, shift_threshold, auto_warmup
        self.policy = (StatsPolicy.named("source") if self.auto else bn if isinstance(bn, StatsPolicy)
                       else StatsPolicy.named(bn, bn_source_weight, site_momentum=site_momentum))
        self.bn_name = bn if isinstance(bn, str) else "custom"
        self.lr, self.ensemble = lr, ensemble
        # geometry="auto": segment a crop at the source's disc scale, mapped back (grata/geometry.py)
        self.geometry = build_geometry(geometry, geometry_reference)
        self.speed = Speed.named(speed)
        self.plan = Plan.resolve(self.speed, torch.device(device))
        self.pooled_weight: float | list[float] = 0.0  # share of coordinator-pooled statistics (set_pooled)
        self.model = convert_norms(copy.deepcopy(model), self.policy).eval()
        self.norms: list[AdaptiveNorm] = norm_layers(self.model)
        self.params = self.collect_params()
        self.plan.prepare(self.model)
        self.generator = torch.Generator().manual_seed(seed)
        self._seed = seed
        self.optimizer = self.make_optimizer()
        self.source_state = copy.deepcopy(self.model.state_dict())
        self._source_params = [p.detach().clone() for p in self.params]
        self.monitor = QualityMonitor(model, quality, self.plan) if quality else None
        self.fallback, self.fallback_margin = fallback, fallback_margin
        self.guard, self.guard_warmup = guard, guard_warmup
        self._reset_guard()
        self.last_step: dict[str, float] = {}
        self.last_teacher: torch.Tensor | None = None  # the weak-view mean, when the last step computed one
        self.images_seen = 0
        self._primed: tuple[torch.Tensor, bool, torch.Tensor] | None = None  # (input, grad, logits): _first_pass
        self.primed_used = 0  # probes that were the step's own first pass (no extra forward)
        self._reset_auto()

    def use_policy(self, policy: StatsPolicy) -> None:
        """Every BN layer normalises under `policy` (plus its pooled share, if any) from the next pass on."""
        self.policy = policy
        weights = self.pooled_weight if isinstance(self.pooled_weight, list) else [self.pooled_weight] * len(self.norms)
        for layer, w in zip(self.norms, weights):
            layer.policy = self._with_pooled(policy, w)

    @staticmethod
    def _with_pooled(policy: StatsPolicy, w: float) -> StatsPolicy:
        if w == 0:
            return replace(policy, pooled=0.0)
        if w == 1:
            return replace(policy, source=0.0, image=0.0, site=0.0, pooled=1.0)
        own = policy.source + policy.image + policy.site
        return replace(policy, pooled=w / (1 - w) * own)

    def set_pooled(self, moments: list[tuple[torch.Tensor, torch.Tensor]], weight: float | list[float]) -> None:
        """Statistics pooled by a coordinator enter every BN layer as one more input with share `weight`
        of the mix (one share for all layers, or one per layer); the site's own policy (bn='auto'
        included) keeps the rest. moments: per layer (m1, m2), each [C]."""
        weights = weight if isinstance(weight, list) else [weight] * len(self.norms)
        if len(moments) != len(self.norms) or len(weights) != len(self.norms):
            raise ValueError(f"pooled statistics for {len(moments)} BN layers ({len(weights)} weights), "
                             f"the model has {len(self.norms)}")
        if not all(0 <= w <= 1 for w in weights):
            raise ValueError(f"pooled weights must lie in [0, 1]: {weights}")
        for layer, (m1, m2) in zip(self.norms, moments):
            layer.set_pooled(m1, m2)
        self.pooled_weight = [float(w) for w in weights] if isinstance(weight, list) else float(weight)
        self.use_policy(self.policy)

    def image_moments(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer (E[x], E[x^2]) of every BN input, each [B, C], from the last adapted batch's own pass."""
        moments = [layer.last_image_moments for layer in self.norms]
        if any(m is None for m in moments):
            raise RuntimeError("no observed pass yet: call adapt_and_predict first")
        return moments

    def _reset_auto(self) -> None:
        self.shift_sum, self.shift_count, self.auto_switched = 0.0, 0, False
        self.use_policy(StatsPolicy.named("source") if self.auto else self.policy)

    def _update_auto(self) -> dict[str, float]:
        """bn='auto': keep the source's statistics unless this site's low-level statistics sit far outside the
        source's own spread (mean shift ratio > shift_threshold after auto_warmup images); then switch the
        site, for the rest of its stream, to each image's own statistics. Decides for the next image."""
        shift = self.norms[0].last_shift
        if shift is None:
            return {}
        ratio = shift / self.shift_reference if self.shift_reference else float("nan")
        if self.auto:
            self.shift_sum, self.shift_count = self.shift_sum + ratio, self.shift_count + 1
            mean = self.shift_sum / self.shift_count
            if not self.auto_switched and self.shift_count >= self.auto_warmup and mean > self.shift_threshold:
                self.auto_switched = True
                self.use_policy(StatsPolicy.named("image"))
            return {"shift_ratio": ratio, "bn_image": float(self.auto_switched)}
        return {"shift_ratio": ratio} if self.shift_reference else {}

    def adopt_image_statistics(self) -> bool:
        """bn='auto' before its own warmup decided: switch to each image's own statistics now (fed_kin, when
        sites like this one confirm a lasting shift). True when it switched; False when not auto or done."""
        if not self.auto or self.auto_switched:
            return False
        self.auto_switched = True
        self.use_policy(StatsPolicy.named("image"))
        return True

    def stem_ratio(self, stem_m1: torch.Tensor, stem_m2: torch.Tensor) -> float:
        """An image's stem shift over the source's own (the unit bn='auto' decides in), from the moments of
        its first BN layer's input [1, C] (the same input whatever the adaptation state)."""
        stem = self.norms[0]
        return gaussian_shift(stem_m1, stem_m2 - stem_m1**2, stem.running_mean, stem.running_var).mean().item() \
            / self.shift_reference

    # --- configuration -------------------------------------------------------------------------
    def collect_params(self) -> list[nn.Parameter]:
        """Only the affine weight and bias of every BN layer adapt; everything else is frozen."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        params = []
        if self.trains:
            for layer in self.norms:
                for p in (layer.weight, layer.bias):
                    p.requires_grad_(True)
                    params.append(p)
        return params

    def make_optimizer(self) -> torch.optim.Optimizer | None:
        if not self.params:
            return None
        return torch.optim.Adam(self.params, lr=self.lr, betas=(0.9, 0.999))

    def describe(self) -> dict[str, Any]:
        """What this adapter is, for tables and run records."""
        auto = {"shift_reference": self.shift_reference, "shift_threshold": self.shift_threshold} if self.auto else {}
        return {"method": self.name, "lr": self.lr, "bn": self.bn_name, "bn_policy": self.policy.__dict__,
                "ensemble": self.ensemble, "quality": self.monitor is not None, "fallback": self.fallback,
                "fallback_margin": self.fallback_margin, "guard": self.guard, "guard_warmup": self.guard_warmup,
                "speed": self.plan.describe(), **auto,
                "geometry": "off" if self.geometry is None else "auto"}

    # --- state -----------------------------------------------------------------------------------
    def reset(self) -> None:
        """Back to the source model: parameters, BN site statistics, optimizer state, RNG."""
        self.model.load_state_dict(self.source_state)
        self.optimizer = self.make_optimizer()
        self.generator.manual_seed(self._seed)
        self.last_step, self.images_seen, self.pooled_weight = {}, 0, 0.0
        self._reset_auto()
        self._reset_guard()
        if self.geometry is not None:
            self.geometry.reset()

    def _norm_state(self) -> dict[str, torch.Tensor]:
        """The BN layers' entries of the model's state_dict, same keys, read from those layers alone (the
        geometry step snapshots this per image: the whole model's state_dict cost ~10 ms at ResNet-34)."""
        if not hasattr(self, "_named_norms"):
            self._named_norms = [(name, m) for name, m in self.model.named_modules() if isinstance(m, AdaptiveNorm)]
        return {f"{name}.{k}": v for name, m in self._named_norms for k, v in m.state_dict().items()}

    def _norm_keys(self) -> set[str]:
        return set(self._norm_state())

    def state_dict(self) -> dict[str, Any]:
        """What adaptation changes, detached: the BN layers (affine parameters, site and pooled statistics),
        the optimizer and RNG. The frozen weights are the source model's and are not repeated here."""
        return _copied({
            "model": self._norm_state(),
            "pooled_weight": self.pooled_weight,
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "generator": self.generator.get_state(),
            "images_seen": self.images_seen,
            "auto": (self.shift_sum, self.shift_count, self.auto_switched),
            "guard": (self.guard_ema, self.guard_best, self.guard_seen, self.guard_resets),
            "geometry_votes": self.geometry.votes if self.geometry is not None else (0, 0, 0),
            "geometry_shares": list(self.geometry.shares) if self.geometry is not None else [],
        })

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["model"]) != self._norm_keys():
            raise ValueError("adapter state does not match this model's BN layers (another architecture?)")
        given = tuple(int(v) for v in state.get("geometry_votes", (0, 0, 0)))  # checked before anything is loaded
        # a 2-count state predates the wide count: it cannot tell a wider field from a near-scale site, so
        # the site's protocol is learnt afresh rather than guessed (and its shares, none, with it)
        votes = (0, 0, 0) if len(given) == 2 else given
        if len(votes) != 3 or not 0 <= votes[2] <= votes[0] <= votes[1]:
            raise ValueError(f"adapter state geometry_votes={given}: needs (other, seen, wide) with "
                             "0 <= wide <= other <= seen")
        other, seen, wide = votes
        shares = [float(v) for v in state.get("geometry_shares", [])]
        if len(shares) > SITE_SHARES or not all(0 < v <= 1 for v in shares):
            raise ValueError(f"adapter state geometry_shares: needs at most {SITE_SHARES} disc shares in (0, 1], "
                             f"got {len(shares)} ({shares[:4]}...)")
        self.model.load_state_dict(state["model"], strict=False)
        self.pooled_weight = state.get("pooled_weight", 0.0)
        if self.optimizer is not None and state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.images_seen = state["images_seen"]
        self.shift_sum, self.shift_count, self.auto_switched = state["auto"]
        self.guard_ema, self.guard_best, self.guard_seen, self.guard_resets = state.get("guard", (None, None, 0, 0))
        if self.geometry is not None:  # the site's crop protocol so far (grata/geometry.py, site_vote)
            self.geometry.votes, self.geometry.shares = (other, seen, wide), shares
        self.use_policy(StatsPolicy.named("image" if self.auto_switched else "source") if self.auto else self.policy)

    # --- the loop --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, observe: bool = False) -> torch.Tensor:
        """One forward pass in the plan's precision and layout -> fp32 logits; observe=True marks it as
        the images' own pass (site statistics update). The geometry step's last probe of exactly this
        input, with the same parameters and gradient mode, is this pass: it is returned, not recomputed."""
        primed, self._primed = self._primed, None
        if primed is not None and primed[0] is x and primed[1] == torch.is_grad_enabled():
            self.primed_used += 1
            if observe:
                for layer in self.norms:
                    layer.commit_pending()
            return primed[2]
        if observe:
            for layer in self.norms:
                layer.observe_next = True
        with self.plan.autocast(grad=torch.is_grad_enabled()):
            return self.model(self.plan.layout(x)).float()

    @torch.no_grad()
    def view_probs(self, x: torch.Tensor, observe: bool = False) -> torch.Tensor:
        """Mean sigmoid over the original and its 5 weak views, mapped back: [B,3,H,W] -> [B,2,H,W]."""
        views = weak_views(x)
        if self.plan.batch_views:
            outs = list(self.forward(torch.cat(views)).chunk(len(views)))
            if observe:  # the site statistics must see the image once, not six views
                self.forward(x, observe=True)
        else:
            outs = [self.forward(v, observe=observe and i == 0) for i, v in enumerate(views)]
        return torch.stack([torch.sigmoid(o) for o in invert_views(outs)]).mean(0)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, observe: bool = False) -> torch.Tensor:
        """The reported prediction: one pass, or with ensemble=True the logit of the weak-view mean."""
        if not self.ensemble:
            return self.forward(x, observe=observe)
        return torch.logit(self.view_probs(x, observe).clamp(1e-6, 1 - 1e-6))

    def adapt_and_predict(self, images: torch.Tensor) -> torch.Tensor:
        """Adapt on a batch, then predict it: float [B, 3, H, W] in [0, 1] -> logits [B, 2, H, W]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        self.last_teacher = None
        self._drop_primed()
        self.primed_used = 0
        images = images.to(self.plan.device)
        self._verdicts: list[tuple[dict, dict, torch.Tensor, torch.Tensor]] = []
        if self.geometry is None:
            logits = self._judged_step(images)
        else:  # the step sees the disc's crop; logits and teacher come back in the original frame
            logits = self.geometry.apply(self._judged_step, images, self.state_dict, self._restore_retry,
                                         probe=self._probe, reused=lambda: self.primed_used,
                                         first_pass=self._first_pass)
            self._drop_primed()  # an unclaimed probe's graph is not kept, nor its held-back BN inputs
            self.last_teacher = self.geometry.to_frame(self.last_teacher)
            self.last_step.update(self.geometry.last)
        self.last_step.update(self._update_auto())
        if self._verdicts:
            logits = self._decide(images, logits)
        if self.guard and self.trains:
            signal = self.last_step.get("quality_gain", self.last_step.get("proxy"))
            if signal is not None:
                self.last_step["guard_reset"] = float(self._check_drift(signal))
        self.images_seen += images.shape[0]
        return logits.detach().cpu()

    def _drop_primed(self) -> None:
        """Forget a first pass no step claimed: its graph and the BN inputs it held back."""
        self._primed = None
        for layer in self.norms:
            layer.pending = None

    @torch.no_grad()
    def _probe(self, x: torch.Tensor) -> torch.Tensor:
        """One pass with the current parameters that adapts nothing and updates no statistics: where
        the geometry step looks for the model's own disc."""
        return self.forward(x)

    first_pass_grad = True  # whether the step's first pass on its input builds a graph (see _first_pass)

    def _first_pass(self, x: torch.Tensor) -> torch.Tensor:
        """A probe (`_probe`) that, should the step then run on this very input, is the step's own first
        pass (`forward` returns it instead of recomputing): the geometry step's look at the whole image
        costs no forward when the image is kept whole. Computed in the step's gradient mode, with the
        BN layers' statistics held back until claimed (an unclaimed one leaves nothing). Not under a
        policy that normalises with the site's running statistics: there the image's own pass updates
        them before it normalises, so a probe, which must not update them, cannot be that pass."""
        self._primed = None
        if any(layer.policy.normalised()[2] > 0 for layer in self.norms):
            return self._probe(x)
        grad = self.first_pass_grad and self.trains
        with torch.set_grad_enabled(grad):
            for layer in self.norms:
                layer.observe_next = "defer"
            logits = self.forward(x)
        self._primed = (x, grad, logits)
        return logits.detach()

    # --- knowing without labels: estimate, fall back, guard ----------------------------------------------
    def _judged_step(self, images: torch.Tensor) -> torch.Tensor:
        """The adapter's step, then the per-image choice between its answer and the source model's.
        With the geometry step this runs on the disc's crop, so the source model it is judged against
        (and falls back to) sees the disc at its own training scale, as the adapter did."""
        logits = self.step(images)
        return logits if self.monitor is None else self._judge(images, logits)

    def _restore_retry(self, state: dict) -> None:
        """The geometry step retries an image on a corrected crop: its first verdict no longer counts."""
        if self._verdicts:
            self._verdicts.pop()
        self.load_state_dict(state)

    def _judge(self, images: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """On the step's input (the crop, with the geometry step): the adapted and the source model's
        predictions and their crop-level features. The choice between them waits for the frame (`_decide`)."""
        feats, feats_src, src = self.monitor.crop_features(images, logits)
        self._verdicts += list(zip(feats, feats_src, logits.detach().cpu(), src.detach().cpu()))
        return logits

    def _decide(self, images: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Per image: estimate the adapted and the source predictions' Dice from their crop-level features,
        keep the adapted one unless the source's estimate leads by more than fallback_margin
        (fallback=True), and record quality (of what is returned), quality_source, quality_gain (mean
        adapted - source), fallback, and last_candidates: (adapted, source) logits in the original frame.
        images [B,3,H,W], logits [B,2,H,W]: the original frame's (the choice is made there, after the
        geometry step mapped both candidates back)."""
        feats, feats_src, adapted, source = zip(*self._verdicts)
        if self.geometry is not None:
            adapted = [self.geometry.logits_to_frame(a, i) for i, a in enumerate(adapted)]
            source = [self.geometry.logits_to_frame(s, i) for i, s in enumerate(source)]
        self.monitor.last_features = {"adapted": list(feats), "source": list(feats_src)}  # for studies
        est = [self.monitor.quality.predict(f) for f in feats]
        est_src = [self.monitor.quality.predict(f) for f in feats_src]
        use_src = [self.fallback and s - a > self.fallback_margin for a, s in zip(est, est_src)]
        self.last_candidates = (torch.stack(adapted), torch.stack(source))  # what the choice was between
        if any(use_src):
            pick = torch.tensor(use_src, device=logits.device).view(-1, 1, 1, 1)
            logits = torch.where(pick, self.last_candidates[1].to(logits.device, logits.dtype), logits)
        chosen = [s if u else a for a, s, u in zip(est, est_src, use_src)]
        n = len(est)
        self.last_step.update(quality=sum(chosen) / n, quality_source=sum(est_src) / n,
                              quality_gain=sum(a - s for a, s in zip(est, est_src)) / n,
                              fallback=sum(use_src) / n)
        return logits

    def _reset_guard(self) -> None:
        self.guard_ema, self.guard_best, self.guard_seen, self.guard_resets = None, None, 0, 0

    def _check_drift(self, signal: float) -> bool:
        """Smooth the guard's signal; True (and parameters back to the source) when it fell `guard` below its
        best. With a quality model the signal is the estimated gain over the source, whose best counts
        from 0: adaptation estimated `guard` points worse than the source model is stepped back too."""
        self.guard_seen += 1
        self.guard_ema = signal if self.guard_ema is None else 0.9 * self.guard_ema + 0.1 * signal
        if self.guard_seen < self.guard_warmup:
            return False
        floor = 0.0 if self.monitor is not None else self.guard_ema
        self.guard_best = max(floor, self.guard_ema if self.guard_best is None else max(self.guard_best, self.guard_ema))
        if not self.guard or self.guard_ema >= self.guard_best - self.guard:
            return False
        with torch.no_grad():
            torch._foreach_copy_(self.params, self._source_params)
        self.optimizer = self.make_optimizer()
        self.guard_resets += 1
        self.guard_best = self.guard_ema = None
        self.guard_seen = 0
        return True

    def step(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def _copied(value: Any) -> Any:
    """A deep copy of nested dicts, lists and tuples whose tensors are cloned, detached. The geometry step
    snapshots the adapter's state per cropped image: copy.deepcopy's per-tensor overhead made that
    ~60 ms (0.15 of a forward) at ResNet-34, cloning ~15 ms (both under cProfile)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copied(v) for v in value)
    return copy.deepcopy(value)
