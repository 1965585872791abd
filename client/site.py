"""One hospital site: its data, its adapter and everything it keeps between rounds. No Flower here.

Each round the site adapts online over its next chunk of images and returns what it may share (see
client/protocol.py). The site's state lives in its state folder, so a fresh process (deployment
starts one per message) continues exactly where the last left off:
  site.pt           adapter state (BN layers, optimizer, RNG), stream position (loaded weights_only)
  source_model.pt   the source model, when the coordinator had to send it
  overlays/         a few predictions drawn over their images; they stay at the site
The privacy ledger is not here: it lives in the node config's ledger-dir, keyed to the site's data
(grata/ledger.py), so a wiped state folder or a new run does not reset the budget.

In the private variant (fed_stats) a site sends, besides its image counts, only noised values: the
BN statistics of the frozen source pass and the Dice proxy's mean (grata/privacy.py), under one
ledger; the alignment summary, timings and the proxy's parts are not sent (docs/privacy.md).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grata.adapters import Adapter, build_adapter
from grata.config import DataConfig, open_domain
from grata.data import StreamReport, stream
from grata.metrics import score
from grata.models import ResUNet, load_checkpoint
from grata.overlay import save_overlay
from client.limits import PRIVATE_VARIANTS, LimitRefused, SiteLimits
from grata.kin import KinRow, confirms, log_shift
from grata.ledger import Ledger, data_key
from grata.privacy import KIN_FIELDS, SCALAR_FIELDS, PrivateMoments, PrivateScalars, SourcePass, clip_relative, from_relative, source_moments, \
    split, to_relative
from grata.proxy import alignment_summary

VARIANTS = ("local_only", "fed_stats", "fed_affine", "fed_kin")


@dataclass
class SiteConfig:
    """What the coordinator tells every site (sent as JSON in the round's ConfigRecord)."""
    data: dict[str, Any]
    adapter: str
    options: dict[str, Any]
    variant: str = "local_only"
    rounds: int = 4
    seed: int = 0
    threads: int = 1
    overlays: int = 2  # predictions drawn per site, kept in its own folder
    clip: float = 1.0
    noise_multiplier: float = 1.0
    epsilon: float = 8.0
    delta: float = 1e-5
    accountant: str = "rdp"
    min_images: int = 2  # fewest images per release asked for; the site's own min-images can only raise it
    metrics_share: float = 0.1  # the share of each round's privacy budget spent on the Dice proxy
    report_dice: bool = True  # evaluation runs ask for labelled Dice; a deployed site sends it only if its node config allows
    state_root: str = ""  # simulation: where sites without a state-dir node config keep their state

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant={self.variant!r}: choose one of {VARIANTS}")
        if self.rounds < 1 or self.min_images < 1 or not 0 < self.metrics_share < 1:
            raise ValueError(f"site config: rounds >= 1, min_images >= 1, 0 < metrics_share < 1 required, got "
                             f"{self.rounds}, {self.min_images}, {self.metrics_share}")

    @property
    def private(self) -> bool:
        """The variants whose every data-dependent value leaves noised."""
        return self.variant in PRIVATE_VARIANTS


def weights_digest(model: ResUNet) -> str:
    """sha256 over the architecture and every weight: the same model has the same digest in any file."""
    h = hashlib.sha256(json.dumps(asdict(model.config), sort_keys=True).encode())
    for key, tensor in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def load_source(path: str | Path) -> tuple[ResUNet, dict, str]:
    """(model, checkpoint metadata, weights digest); one load per file version and process, however
    many rounds and sites it serves."""
    st = Path(path).stat()
    return _load_source(str(path), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=4)
def _load_source(path: str, size: int, mtime: int) -> tuple[ResUNet, dict, str]:
    model, meta = load_checkpoint(path)
    return model, {k: v for k, v in meta.items() if k in ("shift_reference", "quality", "geometry")}, weights_digest(model)


def chunk(n: int, rounds: int, rnd: int, min_images: int = 1) -> range:
    """The images of round `rnd` (1-based): n images split evenly over at most `rounds` rounds, so that
    every chunk holds at least min_images (the site's rule, whatever `rounds` the coordinator asks);
    rounds past the last chunk get no images. n < min_images: one chunk, too small to be released."""
    used = max(1, min(rounds, n // max(1, min_images)))
    if rnd > used:
        return range(n, n)
    return range(math.floor((rnd - 1) * n / used), math.floor(rnd * n / used))


@dataclass
class SiteState:
    adapter: dict[str, Any] | None = None
    last_round: int = 0
    resets: int = 0
    last_reply: dict[str, Any] | None = None  # resent unchanged if the coordinator asks for that round again


class Site:
    """A site named `name` adapting over `dataset` with its state in `state_dir`."""

    def __init__(self, name: str, dataset, state_dir: Path, cfg: SiteConfig, model_path: Path,
                 limits: SiteLimits | None = None, identity: dict | None = None) -> None:
        """limits: the site's own (node config; in simulation what the run asks, ledger in state_dir);
        identity: what names its data for the ledger (default: the site name and its data settings)."""
        self.name, self.dataset, self.cfg = name, dataset, cfg
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.limits = limits or SiteLimits.from_node({}, False, cfg, self.state_dir / "ledger")
        self.limits.check(cfg)  # a coordinator asking for more than the site allows is refused here
        model, meta, digest = load_source(model_path)
        self.limits.check_digest(digest)
        # no global torch.manual_seed here: sites run side by side in threads (InlineGrid with a round
        # timeout), and the adapter draws its augmentations from its own seeded generator
        self.adapter: Adapter = build_adapter(cfg.adapter, model, seed=cfg.seed, shift_reference=meta.get("shift_reference"),
                                              quality=meta.get("quality"),
                                              geometry_reference=meta.get("geometry"), **cfg.options)
        if self.adapter.monitor is None:
            raise RuntimeError(f"site {name}: the source model {Path(model_path).name} has no quality model, so the site "
                               "could not tell whether adaptation helps; add it with python -m grata.train_source "
                               "checkpoint=<that file> (on the source's labelled data)")
        self.state = self._load_state()
        if self.state.adapter is not None:
            self.adapter.load_state_dict(self.state.adapter)
        self.refs = source_moments(self.adapter.norms)  # the source's running statistics: public
        self.min_images = max(cfg.min_images, self.limits.min_images)
        self.ledger = self.source = None
        self.kin: list[KinRow] = []  # fed_kin: the other sites' released shift evidence (set_kin)
        if cfg.private:
            ident = identity or {"site": name, **{k: cfg.data.get(k) for k in ("kind", "root", "size", "seed")}}
            self.ledger = Ledger(self.limits.ledger_dir, data_key(ident), cfg.accountant)
            # the released statistics come from the frozen source model, one image at a time: one
            # image's contribution cannot depend on another image or on the adaptation state
            self.source = SourcePass(model)

    # --- state ---------------------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.state_dir / "site.pt"

    def _load_state(self) -> SiteState:
        if not self.state_file.is_file():
            return SiteState()
        try:
            raw = torch.load(self.state_file, map_location="cpu", weights_only=True)  # tensors and plain data only
            return SiteState(**{k: v for k, v in raw.items() if k in SiteState.__dataclass_fields__})
        except Exception as exc:  # noqa: BLE001
            raise RuntimeError(f"site {self.name}: cannot read its state {self.state_file}: {exc}") from exc

    def save(self) -> None:
        """Atomically: a site killed while saving keeps its previous round's state."""
        self.state.adapter = self.adapter.state_dict()
        tmp = self.state_file.with_suffix(".tmp")
        torch.save(self.state.__dict__, tmp)
        tmp.replace(self.state_file)

    # --- coordinator inputs --------------------------------------------------------------------------
    def reset_to_source(self) -> None:
        """Ordered by the coordinator: back to the source model (the privacy already spent stays spent)."""
        self.adapter.reset()
        self.state.resets += 1

    def set_pooled(self, moments: list[tuple[torch.Tensor, torch.Tensor]], weight: float | list[float]) -> None:
        """Mix the coordinator's pooled statistics in, bounded by what honest pooling could produce: each
        layer's offset from the source is clipped to clip / sqrt(L) (a mean of clipped images is never
        longer), and every share to the node config's max-pooled-weight."""
        if len(moments) != len(self.refs):
            raise ValueError(f"pooled statistics for {len(moments)} layers, the model has {len(self.refs)}")
        bound = self.cfg.clip / math.sqrt(len(self.refs))
        bounded = []
        for (m1, m2), ref in zip(moments, self.refs):
            if m1.shape != ref[0].shape or m2.shape != ref[0].shape or not (torch.isfinite(m1).all() and torch.isfinite(m2).all()):
                raise ValueError("pooled statistics do not match the source model's BN layers or are not finite")
            z = clip_relative(to_relative(m1[None].float(), m2[None].float(), ref), bound)[0]
            bounded.append(from_relative(z, ref))
        cap = self.limits.max_pooled_weight
        weight = [min(max(float(w), 0.0), cap) for w in weight] if isinstance(weight, list) else min(max(float(weight), 0.0), cap)
        self.adapter.set_pooled(bounded, weight)

    def set_affine(self, affine: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Continue from the coordinator's averaged BN affine parameters (the optimizer state is kept),
        each clipped to within max-affine-shift of the source model's (node config)."""
        if len(affine) != len(self.adapter.norms):
            raise ValueError(f"affine parameters for {len(affine)} layers, the model has {len(self.adapter.norms)}")
        shift = self.limits.max_affine_shift
        source = self.adapter.source_state
        with torch.no_grad():
            for (name, layer), (w, b) in zip(self._norm_names(), affine):
                w0, b0 = source[f"{name}.weight"], source[f"{name}.bias"]
                if w.shape != w0.shape or b.shape != b0.shape or not (torch.isfinite(w).all() and torch.isfinite(b).all()):
                    raise ValueError(f"affine parameters for layer {name} do not match the model or are not finite")
                layer.weight.copy_(torch.clamp(w, w0 - shift, w0 + shift))
                layer.bias.copy_(torch.clamp(b, b0 - shift, b0 + shift))

    def set_kin(self, rows: list[KinRow]) -> None:
        """fed_kin: the coordinator's rows of other sites' noisy shift evidence; invalid rows are dropped."""
        self.kin = [r for r in rows if r.valid()][:10_000]

    def _norm_names(self) -> list[tuple[str, torch.nn.Module]]:
        by_id = {id(m): n for n, m in self.adapter.model.named_modules()}
        return [(by_id[id(layer)], layer) for layer in self.adapter.norms]

    # --- the round ---------------------------------------------------------------------------------
    def run_round(self, rnd: int) -> dict[str, Any]:
        """Adapt over this round's chunk; returns metrics, and per variant stats or affine tensors."""
        if rnd == self.state.last_round and self.state.last_reply is not None:
            return self.state.last_reply  # a resumed coordinator asks again: the same answer, no new privacy cost
        if rnd <= self.state.last_round:
            raise RuntimeError(f"site {self.name}: round {rnd} was already done (state at round {self.state.last_round})")
        torch.set_num_threads(max(1, self.cfg.threads))
        indices = chunk(len(self.dataset), self.cfg.rounds, rnd, self.min_images)
        report, steps, proxies, scores = StreamReport(), [], [], []
        kin = self.cfg.variant == "fed_kin"
        stats = PrivateMoments(self.refs, self.cfg.clip, 1.0) if self.cfg.variant == "fed_stats" else None
        shifts: list[float] = []  # fed_kin: each image's log stem shift, released only as a noised mean
        t0 = time.perf_counter()
        resets_before = getattr(self.adapter, "guard_resets", 0)
        for sample in stream(self.dataset, self.cfg.data.get("on_error", "raise"), report, indices=indices):
            x = sample.image[None]
            if kin:  # the source pass's stem moments: this image alone, before it is adapted on
                stem = self.source.moments(x)[0]
                shift = log_shift(self.adapter.stem_ratio(*stem)) if self.adapter.shift_reference else 0.0
                shifts.append(shift)
                if self.kin and confirms(shift, self.kin, self.adapter.shift_threshold, self.adapter.auto_warmup):
                    self.adapter.adopt_image_statistics()
            logits = self.adapter.adapt_and_predict(x)
            probs = torch.sigmoid(logits)
            step = dict(self.adapter.last_step)  # holds the label-free quality estimate of what was predicted
            proxies.append({"dice_proxy": step["quality"], "fallback_share": step["fallback"]})
            steps.append(step)
            if stats is not None:
                stats.add(self.source.moments(x))
            if sample.mask is not None and self.limits.report_dice:  # evaluation only: labels never reach the adapter
                scores.append({k: float(v[0]) for k, v in score(logits, sample.mask[None]).items()})
            if len(proxies) == 1 and rnd > self.cfg.rounds - self.cfg.overlays:  # the last rounds' first images
                save_overlay(self.state_dir / "overlays" / f"round{rnd:02d}_{len(proxies):02d}.png",
                             sample.image, probs[0], sample.mask)
        seconds = time.perf_counter() - t0
        metrics: dict[str, Any] = {"images": len(proxies), "skipped": len(report.skipped)}
        if scores:
            for key in ("dice_disc", "dice_cup", "dice_mean"):
                metrics[key] = float(np.mean([s[key] for s in scores]))
        out: dict[str, Any] = {"metrics": metrics, "skipped": report.skipped}
        if kin:
            self._release_kin(rnd, shifts, proxies, out)
        elif self.cfg.private:
            self._release(rnd, stats, proxies, out)
        else:  # the plain variants share exact values (docs/privacy.md: not covered by any epsilon)
            metrics.update(seconds=seconds, guard_resets=getattr(self.adapter, "guard_resets", 0) - resets_before)
            if proxies:
                for key in proxies[0]:
                    metrics[key] = float(np.mean([p[key] for p in proxies]))
            metrics.update(alignment_summary(steps))
        if self.cfg.variant == "fed_affine":
            out["affine"] = [(n.weight.detach().clone(), n.bias.detach().clone()) for n in self.adapter.norms]
        self.state.last_round, self.state.last_reply = rnd, out
        self.save()
        return out

    def _release_kin(self, rnd: int, shifts: list[float], proxies: list[dict[str, float]], out: dict[str, Any]) -> None:
        """fed_kin's release: the noised mean stem shift and the noised proxy mean, accounted in the ledger first."""
        shares = {"stem_shift": 1 - self.cfg.metrics_share, "dice_proxy": self.cfg.metrics_share}
        sigmas = split(self.cfg.noise_multiplier, shares)
        released, stds = False, {"stem_shift": 0.0, "dice_proxy": 0.0}
        if len(shifts) < self.min_images:
            out["status"] = "below_min_images" if shifts else "ok"
        elif self.ledger.would_spend(list(sigmas.values()), self.cfg.delta) > self.limits.max_epsilon * (1 + 1e-9):
            out["status"] = "budget_exhausted"
            print(f"site {self.name}: privacy budget max-epsilon {self.limits.max_epsilon:g} would be exceeded; "
                  f"nothing released from round {rnd} on", flush=True)
        else:
            self.ledger.record(list(sigmas.values()))  # accounted before anything is computed to leave
            scalars = PrivateScalars(sigmas, bounds={**SCALAR_FIELDS, **KIN_FIELDS})
            for s, p in zip(shifts, proxies):
                scalars.add("stem_shift", s)
                scalars.add("dice_proxy", p["dice_proxy"])
            for f, (mean, std) in scalars.release().items():
                out["metrics"][f] = mean
                stds[f] = std
            out["metrics"]["stats_images"] = len(shifts)
            released = True
        out["privacy"] = {"dp_epsilon": self.ledger.spent(self.cfg.delta), "dp_delta": self.cfg.delta,
                          "dp_noise_std": stds["stem_shift"], "dp_proxy_std": stds["dice_proxy"], "dp_released": float(released)}

    def _release(self, rnd: int, stats: PrivateMoments, proxies: list[dict[str, float]], out: dict[str, Any]) -> None:
        """The private variant's release: noised statistics and proxy mean, accounted in the ledger first."""
        # one round's budget, split: BN statistics, and each declared per-image scalar field equally
        fields = list(SCALAR_FIELDS)
        shares = {"stats": 1 - self.cfg.metrics_share, **{f: self.cfg.metrics_share / len(fields) for f in fields}}
        sigmas = split(self.cfg.noise_multiplier, shares)
        released, proxy_std = False, 0.0
        if stats.count < self.min_images:
            out["status"] = "below_min_images" if stats.count else "ok"
        elif self.ledger.would_spend(list(sigmas.values()), self.cfg.delta) > self.limits.max_epsilon * (1 + 1e-9):
            out["status"] = "budget_exhausted"  # the site keeps adapting and says why it releases nothing
            print(f"site {self.name}: privacy budget max-epsilon {self.limits.max_epsilon:g} would be exceeded; "
                  f"nothing released from round {rnd} on", flush=True)
        else:
            self.ledger.record(list(sigmas.values()))  # accounted before anything is computed to leave
            stats.noise_multiplier = sigmas["stats"]
            out["stats"], out["metrics"]["stats_images"] = stats.release()
            scalars = PrivateScalars({f: sigmas[f] for f in fields})
            for p in proxies:
                for f in fields:
                    scalars.add(f, p[f])
            for f, (mean, std) in scalars.release().items():
                out["metrics"][f] = mean
                if f == "dice_proxy":
                    proxy_std = std
            released = True
        out["privacy"] = {"dp_epsilon": self.ledger.spent(self.cfg.delta), "dp_delta": self.cfg.delta,
                          "dp_noise_std": stats.noise_multiplier * stats.sensitivity if released else 0.0,
                          "dp_proxy_std": proxy_std, "dp_released": float(released)}


def open_site_data(cfg: SiteConfig, domain: str):
    data = DataConfig(**{k: v for k, v in cfg.data.items() if k in DataConfig.__dataclass_fields__})
    return open_domain(data, domain, data.site_split)


__all__ = ["LimitRefused", "Site", "SiteConfig", "SiteState", "VARIANTS", "chunk", "load_source", "open_site_data", "weights_digest"]
