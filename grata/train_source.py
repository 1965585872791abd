"""Train the source model on one domain's train split: `python -m grata.train_source [overrides]`.

Dice + BCE, Adam, random flips. Saves a checkpoint after every epoch and resumes from it when
interrupted; at the end writes <checkpoint>.json with the in-domain test Dice (eval-mode BN).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from hydra.utils import get_original_cwd
from omegaconf import OmegaConf

from grata.adapters.base import shift_reference
from grata.config import DataConfig, TrainConfig, open_domain
from grata.data import stream
from grata.geometry import ensure_reference, geometry_reference
from grata.losses import segmentation_loss
from grata.metrics import score
from grata.models import ModelConfig, ResUNet, load_checkpoint, save_checkpoint
from grata.quality import QUALITY_VERSION, fit_quality, quality_version
from grata.progress import Progress
from grata.speed import native_bf16


@dataclass
class TrainSourceConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: str = ""  # default: checkpoints/source_<kind>_<source>_<encoder>_<size>.pt


def default_checkpoint(cfg: TrainSourceConfig) -> str:
    d, m = cfg.data, cfg.model
    return f"checkpoints/source_{d.kind}_{d.source}_{m.encoder}_{d.size}.pt"


def train_precision(cfg: TrainSourceConfig) -> str:
    """fp32 or bf16; "auto" is bf16 only where this CPU has it natively (emulated bf16 is slower than fp32)."""
    if cfg.train.precision == "auto":
        return "bf16" if native_bf16(torch.device("cpu")) else "fp32"
    return cfg.train.precision


def training_inputs(cfg: TrainSourceConfig) -> dict:
    """What decides the trained weights (not, e.g., the evaluation targets): resume only onto the same."""
    d = cfg.data
    train = {k: v for k, v in asdict(cfg.train).items() if k not in ("threads", "quality_images")}  # not the weights
    train["precision"] = train_precision(cfg)  # what ran, not what was asked
    if train["precision"] == "fp32":  # checkpoints from before the option existed were fp32: still valid
        del train["precision"]
    return {"train": train, "data": [d.kind, d.root, d.size, d.source, d.synthetic_train, d.seed]}


def load_split(cfg: DataConfig, split: str, base: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    """All labelled images of the source domain's split: images [N,3,S,S], masks [N,2,S,S]."""
    ds = open_domain(cfg, cfg.source, split, base)
    samples = list(stream(ds, on_error=cfg.on_error))
    if any(s.mask is None for s in samples):
        raise ValueError(f"source domain {cfg.source!r} ({split}) has images without masks; training needs labels")
    return torch.stack([s.image for s in samples]), torch.stack([s.mask for s in samples])


def evaluate_in_domain(model: ResUNet, images: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
    model.eval()
    scores: dict[str, list[np.ndarray]] = {}
    with torch.no_grad():
        for i in range(0, len(images), 8):
            for k, v in score(model(images[i : i + 8]), masks[i : i + 8], with_asd=False).items():
                scores.setdefault(k, []).append(v)
    return {k: float(np.concatenate(v).mean()) for k, v in scores.items()}


def train_step(model: ResUNet, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, bf16: bool = False) -> float:
    """One supervised step on a batch x [B,3,H,W], y [B,2,H,W]; bf16: autocast (weights stay fp32)."""
    if bf16:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(x)
    loss = segmentation_loss(logits.float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def train(cfg: TrainSourceConfig, base: Path | None = None) -> dict:
    """Train (or resume) and return the summary written beside the checkpoint."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    path = Path(cfg.checkpoint or default_checkpoint(cfg))
    if base is not None and not path.is_absolute():
        path = base / path
    images, masks = load_split(cfg.data, "train", base)
    torch.manual_seed(cfg.train.seed)
    meta: dict = {}
    if path.is_file():
        model, meta = load_checkpoint(path, expect=cfg.model)
        if meta.get("training_inputs") != training_inputs(cfg):
            raise ValueError(f"{path} was trained with another configuration; pass checkpoint=<new path> or delete it")
    else:
        model = ResUNet(cfg.model)
    precision = train_precision(cfg)
    bf16 = precision == "bf16"
    if bf16:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.train.epochs)
    start_epoch, history = 0, []
    if meta:
        opt.load_state_dict(meta["optimizer"])
        sched.load_state_dict(meta["scheduler"])
        start_epoch, history = meta["epoch"], meta["history"]
        torch.set_rng_state(meta["rng"])
        print(f"resuming {path} after epoch {start_epoch}/{cfg.train.epochs}")
    n, bs = len(images), cfg.train.batch_size
    per_epoch = sum(1 for i in range(0, n, bs) if min(bs, n - i) >= 2)
    bar = Progress(per_epoch * (cfg.train.epochs - start_epoch),  # one bar for the whole training: its ETA is the stage's
                   f"training the source model ({cfg.model.encoder}, {cfg.data.size} px, {n} images, {precision})")
    for epoch in range(start_epoch, cfg.train.epochs):
        model.train()
        order, losses, t0 = torch.randperm(n), [], time.perf_counter()
        for i in range(0, n, bs):
            idx = order[i : i + bs]
            x, y = images[idx], masks[idx]
            if len(idx) < 2:  # BatchNorm cannot train on a single image
                continue
            flip = [d for d, p in ((3, 0.5), (2, 0.5)) if torch.rand(()) < p]
            if flip:
                x, y = x.flip(flip), y.flip(flip)
            losses.append(train_step(model, opt, x, y, bf16))
            bar.update(epoch=f"{epoch + 1}/{cfg.train.epochs}", loss=float(np.mean(losses)))
        sched.step()
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "seconds": time.perf_counter() - t0})
        save_checkpoint(path, model, optimizer=opt.state_dict(), scheduler=sched.state_dict(), epoch=epoch + 1,
                        history=history, rng=torch.get_rng_state(), training_inputs=training_inputs(cfg))
    bar.close()
    if "shift_reference" not in meta:
        meta["shift_reference"] = shift_reference(model, images)  # the unit bn="auto" measures shifts in
    if "geometry" not in meta:  # the source's disc scale, for the geometry step (grata/geometry.py)
        meta["geometry"] = geometry_reference(images, masks)
    if quality_version(meta.get("quality")) < QUALITY_VERSION:
        # the label-free Dice estimate, its level read on these labelled images (grata/quality.py)
        t0 = time.perf_counter()
        meta["quality"] = fit_quality(model.eval(), images, masks, limit=cfg.train.quality_images, seed=cfg.train.seed)
        print(f"quality model fitted on {meta['quality']['info']['images']} source images "
              f"({time.perf_counter() - t0:.0f}s)")
    save_checkpoint(path, model, optimizer=opt.state_dict(), scheduler=sched.state_dict(), epoch=cfg.train.epochs,
                    history=history, rng=torch.get_rng_state(), training_inputs=training_inputs(cfg),
                    shift_reference=meta["shift_reference"], quality=meta["quality"], geometry=meta["geometry"])
    test_images, test_masks = load_split(cfg.data, "test", base)
    summary = {
        "checkpoint": str(path), "data": asdict(cfg.data), "model": asdict(cfg.model), "train": asdict(cfg.train),
        "in_domain_test": evaluate_in_domain(model, test_images, test_masks), "test_images": len(test_images),
        "history": history, "shift_reference": meta["shift_reference"], "geometry": meta["geometry"],
    }
    path.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    d = summary["in_domain_test"]
    print(f"in-domain test Dice ({cfg.data.source}, {len(test_images)} images): disc {d['dice_disc']:.2f} "
          f"cup {d['dice_cup']:.2f} mean {d['dice_mean']:.2f} -> {path}")
    return summary


def ensure_source(cfg: TrainSourceConfig, base: Path | None) -> Path:
    """The configured source checkpoint, trained first if it (or its summary) does not exist yet."""
    path = Path(cfg.checkpoint or default_checkpoint(cfg))
    full = path if path.is_absolute() or base is None else base / path
    # a default path without its summary is a training to finish; a model the user names needs no summary
    unfinished = not cfg.checkpoint and not full.with_suffix(".json").is_file()
    model, meta = load_checkpoint(full) if full.is_file() else (None, {})
    if model is None or unfinished or "quality" not in meta:
        print(f"no source model (or no quality model) at {full}: training or completing it first")
        train(TrainSourceConfig(data=cfg.data, model=cfg.model, train=cfg.train, checkpoint=str(full)), base)
    elif not meta.get("geometry") or quality_version(meta.get("quality")) < QUALITY_VERSION:
        complete_metadata(full, cfg.data, cfg.train, base, (model, meta))
    return full


def complete_metadata(path: Path, data: DataConfig, train_cfg: TrainConfig, base: Path | None,
                      loaded: tuple[ResUNet, dict] | None = None) -> dict:
    """A checkpoint from before the geometry step, or with a quality model older than QUALITY_VERSION
    (`loaded`: its (model, metadata) when already read): what it lacks, measured on its training split
    (read at most once) and written into the checkpoint in one save. The weights stay; the source
    digest (weights and metadata) changes, so a site pins the digest of the completed checkpoint
    (simulations/deploy_local.py does). Returns the metadata."""
    model, meta = loaded or load_checkpoint(path)
    split: list[tuple[torch.Tensor, torch.Tensor]] = []

    def train_split() -> tuple[torch.Tensor, torch.Tensor]:
        if not split:
            split.append(load_split(data, "train", base))
        return split[0]

    if not meta.get("geometry"):
        ensure_reference(meta, train_split)
        print(f"{path}: added the source's disc geometry (disc share {meta['geometry']['disc_share']:.3f})")
    if quality_version(meta.get("quality")) < QUALITY_VERSION:
        t0 = time.perf_counter()
        meta["quality"] = fit_quality(model.eval(), *train_split(), limit=train_cfg.quality_images, seed=train_cfg.seed)
        print(f"{path}: refitted the quality model (version {QUALITY_VERSION}, "
              f"{meta['quality']['info']['images']} images, {time.perf_counter() - t0:.0f}s)")
    save_checkpoint(path, model, **meta)
    return meta


ConfigStore.instance().store(name="train_source_schema", node=TrainSourceConfig)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train_source")
def main(cfg) -> None:
    typed: TrainSourceConfig = OmegaConf.to_object(cfg)  # runs the dataclass checks before any work
    train(typed, base=Path(get_original_cwd()))


if __name__ == "__main__":
    main()
