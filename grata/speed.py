"""How an adapter's passes run: precision, memory layout, batching of views. Never what they compute.

Two presets:
  faithful  fp32, contiguous memory, one forward per view: the paper code's arithmetic, kept as the
            reference every speed-up is measured and checked against (bench/step.py, bench/dice.py);
  fast      the default: bf16 autocast where the device has native bf16 (CPUs with AVX512-BF16 or
            AMX, CUDA GPUs with bf16), channels-last memory, views batched on a GPU only (on a
            2-core CPU six single forwards measured faster than one batch of six).
torch.compile is not used: on the 2-core CPU it took ~50 s per graph for 15% off a no-grad forward
and nothing off a gradient pass (bench/step.py --compile measures it again).
Parameters, optimizer state, losses, gradients handed to the optimizer and BN statistics stay fp32
in both; only the convolutions' arithmetic changes. Measured Dice cost of `fast`: README, "Speed".
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
import torch

PRECISIONS = ("fp32", "bf16", "auto")
BATCHING = ("auto", "on", "off")


@dataclass(frozen=True)
class Speed:
    precision: str = "auto"  # passes without gradient: fp32 | bf16 | auto (bf16 where native)
    grad_precision: str = "auto"  # passes with gradient (the two gradient passes of GraTa, TENT's, SAR's)
    channels_last: bool = True
    batch_views: str = "auto"  # auto: one batch of all views on a GPU, one view at a time on a CPU

    def __post_init__(self) -> None:
        for key in ("precision", "grad_precision"):
            if getattr(self, key) not in PRECISIONS:
                raise ValueError(f"speed.{key}={getattr(self, key)!r}: choose one of {PRECISIONS}")
        if self.batch_views not in BATCHING:
            raise ValueError(f"speed.batch_views={self.batch_views!r}: choose one of {BATCHING}")

    @classmethod
    def named(cls, name: "str | Speed | dict") -> "Speed":
        """A preset name ('fast', 'faithful'), a dict of fields, or a Speed."""
        if isinstance(name, Speed):
            return name
        if isinstance(name, dict):
            base = cls.named(name.get("preset", "fast"))
            return replace(base, **{k: v for k, v in name.items() if k != "preset"})
        if name not in PRESETS:
            raise ValueError(f"speed={name!r}: choose one of {sorted(PRESETS)} or give its fields")
        return PRESETS[name]


PRESETS = {
    "fast": Speed(),
    "faithful": Speed(precision="fp32", grad_precision="fp32", channels_last=False, batch_views="off"),
}


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 convolutions run natively (fast) on `device`, rather than emulated (slow)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


@dataclass(frozen=True)
class Plan:
    """A Speed resolved for one device: what actually happens."""
    device: torch.device
    bf16: bool  # passes without gradient
    grad_bf16: bool
    channels_last: bool
    batch_views: bool

    @classmethod
    def resolve(cls, speed: Speed, device: torch.device) -> "Plan":
        native = native_bf16(device)
        pick = {"fp32": False, "bf16": True, "auto": native}
        return cls(device=device, bf16=pick[speed.precision], grad_bf16=pick[speed.grad_precision],
                   channels_last=speed.channels_last,
                   batch_views={"on": True, "off": False, "auto": device.type == "cuda"}[speed.batch_views])

    def autocast(self, grad: bool) -> contextlib.AbstractContextManager:
        """The precision context for one pass (grad: the pass builds a graph for a gradient)."""
        if self.grad_bf16 if grad else self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move `model` (in place) to the device and layout. When every pass runs in bf16, frozen
        convolution weights are stored in bf16 once: autocast caches casts only for weights that
        require a gradient, so frozen ones would be cast again in every pass (measured: ~7% of a
        GraTa step on the 2-core CPU). Trainable parameters (the BN affine ones) stay fp32."""
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        if self.bf16 and self.grad_bf16:
            for module in model.modules():
                if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                    for p in module.parameters(recurse=False):
                        if not p.requires_grad:
                            p.data = p.data.to(torch.bfloat16)
        return model

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] in the memory format and on the device the model expects."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def describe(self) -> dict[str, object]:
        return {"device": str(self.device), "bf16": self.bf16, "grad_bf16": self.grad_bf16,
                "channels_last": self.channels_last, "batch_views": self.batch_views}

