"""ResUNet: a ResNet encoder with a U-Net decoder, as GraTa uses for optic disc/cup segmentation.

Output: float logits [B, 2, H, W]; channel 0 = optic disc (cup included), channel 1 = optic cup.
Checkpoints carry the architecture so a model is always rebuilt exactly as it was trained.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}


@dataclass
class ModelConfig:
    encoder: str = "resnet34"
    num_classes: int = 2
    decoder_width: int = 256

    def __post_init__(self) -> None:
        if self.encoder not in BLOCKS:
            raise ValueError(f"model.encoder={self.encoder!r}: choose one of {sorted(BLOCKS)}")


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNetEncoder(nn.Module):
    """Returns the stem activation (H/2) and the four stage outputs (H/4 .. H/32)."""

    def __init__(self, blocks: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths, c_in, stages = (64, 128, 256, 512), 64, []
        for i, (n, c) in enumerate(zip(blocks, widths)):
            stride = 1 if i == 0 else 2
            stage = [BasicBlock(c_in, c, stride)] + [BasicBlock(c, c, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*stage))
            c_in = c
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        stem = self.relu(self.bn1(self.conv1(x)))
        f1 = self.layer1(self.maxpool(stem))
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return [stem, f1, f2, f3, self.layer4(f3)]


class UpBlock(nn.Module):
    """Transposed conv on the up path, 1x1 conv on the skip, concatenate, ReLU, BatchNorm."""

    def __init__(self, c_up: int, c_skip: int, c_out: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(c_up, c_out // 2, 2, stride=2)
        self.skip = nn.Conv2d(c_skip, c_out // 2, 1)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, up: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.relu(torch.cat([self.up(up), self.skip(skip)], dim=1)))


class ResUNet(nn.Module):
    def __init__(self, config: ModelConfig = ModelConfig()) -> None:
        super().__init__()
        self.config = config
        w = config.decoder_width
        self.encoder = ResNetEncoder(BLOCKS[config.encoder])
        self.up1 = UpBlock(512, 256, w)
        self.up2 = UpBlock(w, 128, w)
        self.up3 = UpBlock(w, 64, w)
        self.up4 = UpBlock(w, 64, w)
        self.head = nn.Sequential(
            nn.ConvTranspose2d(w, 32, 2, stride=2), nn.BatchNorm2d(32), nn.ReLU(inplace=True), nn.Conv2d(32, config.num_classes, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: float [B, 3, H, W] in [0, 1], H and W multiples of 32 -> logits [B, num_classes, H, W]."""
        if x.shape[-1] % 32 or x.shape[-2] % 32:
            raise ValueError(f"image size {tuple(x.shape[-2:])} must be a multiple of 32")
        stem, f1, f2, f3, f4 = self.encoder(x)
        d = self.up4(self.up3(self.up2(self.up1(f4, f3), f2), f1), stem)
        return self.head(d)


def build_model(encoder: str = "resnet34", **kwargs: Any) -> ResUNet:
    return ResUNet(ModelConfig(encoder=encoder, **kwargs))


class CheckpointError(RuntimeError):
    pass


def save_checkpoint(path: str | Path, model: ResUNet, **extra: Any) -> None:
    """Write the weights with the architecture (and any run metadata) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"model_config": asdict(model.config), "state_dict": model.state_dict(), **extra}, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path, expect: ModelConfig | None = None) -> tuple[ResUNet, dict[str, Any]]:
    """Rebuild the model a checkpoint describes; strict: any mismatch is an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(payload, dict) or "model_config" not in payload or "state_dict" not in payload:
        raise CheckpointError(f"{path} is not a fedgrata checkpoint (no model_config/state_dict)")
    config = ModelConfig(**payload["model_config"])
    if expect is not None and expect != config:
        raise CheckpointError(f"{path} holds {config}, but the configuration asks for {expect}")
    model = ResUNet(config)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not match {config}: {exc}") from exc
    meta = {k: v for k, v in payload.items() if k not in ("model_config", "state_dict")}
    return model, meta
