"""One hospital site: its data, its adapter and everything it keeps between rounds. No Flower here.

Each round the site adapts online over its next chunk of images and returns what it may share (see
client/protocol.py). The site's state lives in its state folder, so a fresh process (deployment
starts one per message) continues exactly where the last left off:
  site.pt           adapter state (BN layers, optimizer, RNG), stream position, privacy accountant
  source_model.pt   the source model, when the coordinator had to send it
  overlays/         a few predictions drawn over their images; they stay at the site
"""
from __future__ import annotations

import hashlib
import json
import math
import secrets
import time
from dataclasses import asdict, dataclass, field
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
from grata.privacy import PrivateMoments, source_moments
from grata.proxy import alignment_summary

VARIANTS = ("local_only", "fed_stats", "fed_affine")


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
    state_root: str = ""  # simulation: where sites without a state-dir node config keep their state

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant={self.variant!r}: choose one of {VARIANTS}")


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


def chunk(n: int, rounds: int, rnd: int) -> range:
    """The images of round `rnd` (1-based) when n images are split evenly over `rounds` rounds."""
    return range(math.floor((rnd - 1) * n / rounds), math.floor(rnd * n / rounds))


@dataclass
class SiteState:
    adapter: dict[str, Any] | None = None
    last_round: int = 0
    privacy_history: list = field(default_factory=list)
    resets: int = 0
    last_reply: dict[str, Any] | None = None  # resent unchanged if the coordinator asks for that round again


class Site:
    """A site named `name` adapting over `dataset` with its state in `state_dir`."""

    def __init__(self, name: str, dataset, state_dir: Path, cfg: SiteConfig, model_path: Path,
                 max_epsilon: float | None = None) -> None:
        """max_epsilon: the site's own privacy budget (node config); the coordinator's cannot raise it."""
        self.name, self.dataset, self.cfg = name, dataset, cfg
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        model, meta, _ = load_source(model_path)
        torch.manual_seed(cfg.seed)
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
        self.private = None
        if cfg.variant == "fed_stats":
            budget = cfg.epsilon if max_epsilon is None else min(cfg.epsilon, max_epsilon)
            self.private = PrivateMoments(source_moments(self.adapter.norms), cfg.clip, cfg.noise_multiplier,
                                          budget, cfg.delta, cfg.accountant, list(self.state.privacy_history))
        # The privacy noise must be unknown to the coordinator (it could otherwise regenerate and subtract
        # it), so it is drawn from the OS's entropy, never from the configuration's seed.
        self.noise = torch.Generator().manual_seed(secrets.randbits(63))

    # --- state ---------------------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.state_dir / "site.pt"

    def _load_state(self) -> SiteState:
        if not self.state_file.is_file():
            return SiteState()
        try:
            raw = torch.load(self.state_file, map_location="cpu", weights_only=False)
            return SiteState(**raw)
        except Exception as exc:  # noqa: BLE001
            raise RuntimeError(f"site {self.name}: cannot read its state {self.state_file}: {exc}") from exc

    def save(self) -> None:
        """Atomically: a site killed while saving keeps its previous round's state."""
        self.state.adapter = self.adapter.state_dict()
        if self.private is not None:
            self.state.privacy_history = self.private.history
        tmp = self.state_file.with_suffix(".tmp")
        torch.save(self.state.__dict__, tmp)
        tmp.replace(self.state_file)

    # --- coordinator inputs --------------------------------------------------------------------------
    def reset_to_source(self) -> None:
        """Ordered by the coordinator: back to the source model (the privacy already spent stays spent)."""
        self.adapter.reset()
        self.state.resets += 1

    def set_pooled(self, moments: list[tuple[torch.Tensor, torch.Tensor]], weight: float) -> None:
        self.adapter.set_pooled(moments, weight)

    def set_affine(self, affine: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Continue from the coordinator's averaged BN affine parameters (the optimizer state is kept)."""
        if len(affine) != len(self.adapter.norms):
            raise ValueError(f"affine parameters for {len(affine)} layers, the model has {len(self.adapter.norms)}")
        with torch.no_grad():
            for layer, (w, b) in zip(self.adapter.norms, affine):
                layer.weight.copy_(w)
                layer.bias.copy_(b)

    # --- the round ---------------------------------------------------------------------------------
    def run_round(self, rnd: int) -> dict[str, Any]:
        """Adapt over this round's chunk; returns metrics, and per variant stats or affine tensors."""
        if rnd == self.state.last_round and self.state.last_reply is not None:
            return self.state.last_reply  # a resumed coordinator asks again: the same answer, no new privacy cost
        if rnd <= self.state.last_round:
            raise RuntimeError(f"site {self.name}: round {rnd} was already done (state at round {self.state.last_round})")
        torch.set_num_threads(max(1, self.cfg.threads))
        indices = chunk(len(self.dataset), self.cfg.rounds, rnd)
        report, steps, proxies, scores = StreamReport(), [], [], []
        t0 = time.perf_counter()
        resets_before = getattr(self.adapter, "guard_resets", 0)
        for sample in stream(self.dataset, self.cfg.data.get("on_error", "raise"), report, indices=indices):
            x = sample.image[None]
            logits = self.adapter.adapt_and_predict(x)
            probs = torch.sigmoid(logits)
            step = dict(self.adapter.last_step)  # holds the label-free quality estimate of what was predicted
            proxies.append({"dice_proxy": step["quality"], "fallback_share": step["fallback"]})
            steps.append(step)
            if self.private is not None:
                self.private.add(self.adapter.image_moments())
            if sample.mask is not None:  # evaluation only: labels never reach the adapter
                scores.append({k: float(v[0]) for k, v in score(logits, sample.mask[None]).items()})
            if len(proxies) == 1 and rnd > self.cfg.rounds - self.cfg.overlays:  # the last rounds' first images
                save_overlay(self.state_dir / "overlays" / f"round{rnd:02d}_{len(proxies):02d}.png",
                             sample.image, probs[0], sample.mask)
        seconds = time.perf_counter() - t0
        metrics: dict[str, Any] = {"images": len(proxies), "skipped": len(report.skipped), "seconds": seconds,
                                   "guard_resets": getattr(self.adapter, "guard_resets", 0) - resets_before}
        if proxies:
            for key in proxies[0]:
                metrics[key] = float(np.mean([p[key] for p in proxies]))
        metrics.update(alignment_summary(steps))
        if scores:
            for key in ("dice_disc", "dice_cup", "dice_mean"):
                metrics[key] = float(np.mean([s[key] for s in scores]))
        out: dict[str, Any] = {"metrics": metrics, "skipped": report.skipped}
        if self.private is not None:
            released = self.private.release(self.noise)
            out["privacy"] = {"dp_epsilon": self.private.spent(), "dp_delta": self.cfg.delta,
                              "dp_noise_std": self.private.noise_std, "dp_released": float(released is not None)}
            if released is not None:
                out["stats"], out["metrics"]["stats_images"] = released
            elif proxies:  # the budget is spent: the site keeps adapting and says why it releases nothing
                out["status"] = "budget_exhausted"
                print(f"site {self.name}: privacy budget epsilon {self.private.epsilon:g} would be exceeded; "
                      f"no statistics released from round {rnd} on", flush=True)
        if self.cfg.variant == "fed_affine":
            out["affine"] = [(n.weight.detach().clone(), n.bias.detach().clone()) for n in self.adapter.norms]
        self.state.last_round, self.state.last_reply = rnd, out
        self.save()
        return out


def open_site_data(cfg: SiteConfig, domain: str):
    data = DataConfig(**{k: v for k, v in cfg.data.items() if k in DataConfig.__dataclass_fields__})
    return open_domain(data, domain, data.site_split)


__all__ = ["Site", "SiteConfig", "SiteState", "VARIANTS", "chunk", "load_source", "open_site_data", "weights_digest"]
