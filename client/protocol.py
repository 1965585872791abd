"""What travels between a site and the coordinator, and the one list of what a site may send.

A site's reply to a round is a Flower RecordDict with at most these records:
  "site"     ConfigRecord  name (the configured site label) and status
  "metrics"  MetricRecord  the proxy, the alignment summary, counts and timing, and Dice when labelled
  "privacy"  MetricRecord  fed_stats only: epsilon spent, delta, noise std, whether released
  "stats"    ArrayRecord   fed_stats only: "<layer>.sum", the noisy source-relative moment sums [2C]
  "affine"   ArrayRecord   fed_affine only: "<layer>.weight" and "<layer>.bias" [C]
Every array is one-dimensional and per channel; nothing image-sized exists in the list. Both sides
check a reply against it: the site before sending (fail closed), the coordinator before using it.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from grata.proxy import COSINE_BINS

MAX_CHANNELS = 512  # the widest BN layer of ResUNet-18/-34; arrays are at most 2x this long

METRIC_KEYS = {
    "images", "skipped", "seconds", "guard_resets", "stats_images",
    "dice_proxy", "fallback_share",
    "align_cos_mean", "align_cos_std", "align_cos_hist", "align_neg_share", "lr_mean", "entropy", "consistency",
    "dice_disc", "dice_cup", "dice_mean",  # only where the site has labels: evaluation, never adaptation
}
PRIVACY_KEYS = {"dp_epsilon", "dp_delta", "dp_noise_std", "dp_released"}
SITE_KEYS = {"name", "status", "has_model", "images_total", "labelled"}
ARRAY_KEYS = {"stats": re.compile(r"^\d+\.sum$"), "affine": re.compile(r"^\d+\.(weight|bias)$")}

ALLOWED: dict[str, dict[str, set[str] | re.Pattern]] = {
    "local_only": {"site": SITE_KEYS, "metrics": METRIC_KEYS},
    "fed_stats": {"site": SITE_KEYS, "metrics": METRIC_KEYS, "privacy": PRIVACY_KEYS, "stats": ARRAY_KEYS["stats"]},
    "fed_affine": {"site": SITE_KEYS, "metrics": METRIC_KEYS, "affine": ARRAY_KEYS["affine"]},
}


class ReplyRejected(ValueError):
    """A reply holds something outside the allowed list, or a value that cannot be used."""


def audit(content: RecordDict, variant: str) -> list[dict[str, Any]]:
    """Check a reply against the allowed list; returns its inventory (record, key, kind, shape, bytes).

    Raises ReplyRejected on an unknown record or key, an array that is not a per-channel vector, or
    a value that is NaN or infinite.
    """
    allowed = ALLOWED[variant]
    inventory = []
    for record_name, record in content.items():
        if record_name not in allowed:
            raise ReplyRejected(f"record {record_name!r} is not allowed for variant {variant}")
        rule = allowed[record_name]
        for key, value in record.items():
            ok = rule.match(key) if isinstance(rule, re.Pattern) else key in rule
            if not ok:
                raise ReplyRejected(f"key {record_name}.{key} is not allowed for variant {variant}")
            if isinstance(record, ArrayRecord):
                shape = tuple(value.shape)
                if len(shape) != 1 or shape[0] > 2 * MAX_CHANNELS:
                    raise ReplyRejected(f"array {record_name}.{key} has shape {shape}: only per-channel vectors may leave a site")
                if not torch.isfinite(torch.from_numpy(value.numpy())).all():
                    raise ReplyRejected(f"array {record_name}.{key} holds NaN or infinite values")
                inventory.append({"record": record_name, "key": key, "kind": "array", "shape": shape,
                                  "bytes": len(value.data)})
                continue
            values = value if isinstance(value, list) else [value]
            if isinstance(record, MetricRecord) and not all(math.isfinite(v) for v in values):
                raise ReplyRejected(f"metric {record_name}.{key} is not finite: {value}")
            if record_name == "metrics" and key == "align_cos_hist" and len(values) != COSINE_BINS:
                raise ReplyRejected(f"metrics.align_cos_hist has {len(values)} bins, expected {COSINE_BINS}")
            inventory.append({"record": record_name, "key": key, "kind": type(record).__name__,
                              "shape": (len(values),), "bytes": len(json.dumps(value))})
    return inventory


# --- site outputs <-> records ----------------------------------------------------------------------
def reply_content(name: str, out: dict[str, Any]) -> RecordDict:
    """A Site.run_round result as the records listed above."""
    content = RecordDict({"site": ConfigRecord({"name": name, "status": out.get("status", "ok")}),
                          "metrics": MetricRecord({k: v for k, v in out["metrics"].items()})})
    if "privacy" in out:
        content["privacy"] = MetricRecord(out["privacy"])
    if "stats" in out:
        content["stats"] = ArrayRecord({f"{i}.sum": s.float().contiguous() for i, s in enumerate(out["stats"])})
    if "affine" in out:
        arrays = {}
        for i, (w, b) in enumerate(out["affine"]):
            arrays[f"{i}.weight"], arrays[f"{i}.bias"] = w.float().contiguous(), b.float().contiguous()
        content["affine"] = ArrayRecord(arrays)
    return content


def layer_tensors(record: ArrayRecord, names: tuple[str, ...]) -> list[tuple[torch.Tensor, ...]]:
    """ArrayRecord {"<layer>.<name>": [C]} -> per layer, in layer order, a tuple of tensors."""
    tensors = record.to_torch_state_dict()
    layers = sorted({int(k.split(".")[0]) for k in tensors})
    if layers != list(range(len(layers))):
        raise ReplyRejected(f"layers {layers} are not numbered 0..{len(layers) - 1}")
    try:
        return [tuple(tensors[f"{i}.{n}"] for n in names) for i in layers]
    except KeyError as exc:
        raise ReplyRejected(f"missing array {exc}") from exc


def layer_record(layers: list[tuple[torch.Tensor, ...]], names: tuple[str, ...]) -> ArrayRecord:
    return ArrayRecord({f"{i}.{n}": t.float().contiguous() for i, ts in enumerate(layers) for n, t in zip(names, ts)})


__all__ = ["ALLOWED", "ReplyRejected", "audit", "layer_record", "layer_tensors", "reply_content"]
