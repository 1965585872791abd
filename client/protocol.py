"""What travels between a site and the coordinator, and the one list of what a site may send.

A site's reply to a round is a Flower RecordDict with at most these records:
  "site"     ConfigRecord  name (the configured site label) and status (from a closed set)
  "metrics"  MetricRecord  local_only/fed_affine: the proxy, the alignment summary, counts and timing;
                           fed_stats: counts and the noised proxy only; Dice only where labelled and allowed
  "privacy"  MetricRecord  fed_stats and fed_kin: ledger epsilon, delta, noise stds, whether released
  fed_kin's "metrics" add stem_shift, the noised mean log stem shift of the round (grata/kin.py)
  "stats"    ArrayRecord   fed_stats only: "<layer>.sum", the noisy source-relative moment sums [2C]
  "affine"   ArrayRecord   fed_affine only: "<layer>.weight" and "<layer>.bias" [C]
Every array is one-dimensional and per channel; nothing image-sized exists in the list, and a reply
is capped at MAX_REPLY_BYTES. Both sides check a reply against it with `audit`: the site before
sending (fail closed), the coordinator before using it.
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
MAX_LAYERS = 128  # ResUNet-34 has 45 BN layers
MAX_IMAGES = 100_000  # a site's whole stream; a round's counts can never exceed it (a lying count is refused)
MAX_REPLY_BYTES = 256_000  # ResUNet-34's fed_stats reply is ~77 kB of arrays; nothing may smuggle more
MAX_NAME = 64
STATUSES = {"ok", "budget_exhausted", "below_min_images"}
NAME = re.compile(r"^[A-Za-z0-9_.-]{1,%d}$" % MAX_NAME)

COUNT_KEYS = {"images", "skipped", "stats_images"}
DICE_KEYS = {"dice_disc", "dice_cup", "dice_mean"}  # only where the site holds labels and allows it: evaluation only
PLAIN_METRICS = COUNT_KEYS - {"stats_images"} | DICE_KEYS | {
    "seconds", "guard_resets", "dice_proxy", "fallback_share",
    "align_cos_mean", "align_cos_std", "align_cos_hist", "align_neg_share", "lr_mean", "entropy", "consistency"}
PRIVATE_METRICS = COUNT_KEYS | DICE_KEYS | {"dice_proxy"}  # the proxy arrives noised (grata/privacy.py)
KIN_METRICS = PRIVATE_METRICS | {"stem_shift"}  # fed_kin: + the noised mean log stem shift (grata/kin.py)
LISTS = {"align_cos_hist": COSINE_BINS}  # the only list-valued metric, and its exact length
PRIVACY_KEYS = {"dp_epsilon", "dp_delta", "dp_noise_std", "dp_proxy_std", "dp_released"}
SITE_KEYS = {"name", "status"}
INTRO_KEYS = {"name", "status", "has_model", "images_total", "labelled"}
ARRAY_KEYS = {"stats": re.compile(r"^(\d{1,3})\.sum$"), "affine": re.compile(r"^(\d{1,3})\.(weight|bias)$")}
PER_CHANNEL = {"stats": 2, "affine": 1}  # array length per channel of its layer

ALLOWED: dict[str, dict[str, set[str] | re.Pattern]] = {
    "query": {"site": INTRO_KEYS},
    "local_only": {"site": SITE_KEYS, "metrics": PLAIN_METRICS},
    "fed_stats": {"site": SITE_KEYS, "metrics": PRIVATE_METRICS, "privacy": PRIVACY_KEYS, "stats": ARRAY_KEYS["stats"]},
    "fed_affine": {"site": SITE_KEYS, "metrics": PLAIN_METRICS, "affine": ARRAY_KEYS["affine"]},
    "fed_kin": {"site": SITE_KEYS, "metrics": KIN_METRICS, "privacy": PRIVACY_KEYS},
}
REQUIRED = {"fed_stats": {"privacy": PRIVACY_KEYS}, "fed_kin": {"privacy": PRIVACY_KEYS}}


class ReplyRejected(ValueError):
    """A reply holds something outside the allowed list, or a value that cannot be used."""


def _scalar(record_name: str, key: str, value: Any) -> list[float]:
    values = value if isinstance(value, list) else [value]
    want = LISTS.get(key)
    if isinstance(value, list) != (want is not None and record_name == "metrics") or (want and len(values) != want):
        raise ReplyRejected(f"{record_name}.{key}: expected {'a list of ' + str(want) if want else 'one number'}, "
                            f"got {type(value).__name__} of {len(values)}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise ReplyRejected(f"{record_name}.{key} is not a finite number: {str(value)[:40]}")
    return values


def audit(content: RecordDict, variant: str, channels: list[int] | None = None) -> list[dict[str, Any]]:
    """Check a reply against the allowed list; returns its inventory (record, key, kind, shape, bytes).

    Exact per variant: only its records and keys, every metric one finite number except the named
    fixed-length lists, counts within MAX_IMAGES, the site's words from a closed set, arrays per
    channel (with `channels` [C_l per BN layer]: exactly layers 0..L-1, each of its exact length),
    and the whole reply under MAX_REPLY_BYTES. Raises ReplyRejected on anything else.
    """
    if variant not in ALLOWED:
        raise ReplyRejected(f"unknown variant {variant!r}")
    allowed = ALLOWED[variant]
    inventory, total, layers_seen = [], 0, {}
    for record_name, record in content.items():
        if record_name not in allowed:
            raise ReplyRejected(f"record {record_name!r} is not allowed for variant {variant}")
        rule = allowed[record_name]
        for key, value in record.items():
            match = rule.match(key) if isinstance(rule, re.Pattern) else key in rule
            if not match:
                raise ReplyRejected(f"key {record_name}.{key} is not allowed for variant {variant}")
            if isinstance(record, ArrayRecord):
                shape = tuple(value.shape)
                layer = int(match.group(1))
                if len(shape) != 1 or shape[0] > 2 * MAX_CHANNELS or layer >= MAX_LAYERS:
                    raise ReplyRejected(f"array {record_name}.{key} has shape {shape}: only per-channel vectors may leave a site")
                if channels is not None and (layer >= len(channels) or shape[0] != PER_CHANNEL[record_name] * channels[layer]):
                    raise ReplyRejected(f"array {record_name}.{key} has shape {shape}, not the model's layer {layer}")
                if not torch.isfinite(torch.from_numpy(value.numpy())).all():
                    raise ReplyRejected(f"array {record_name}.{key} holds NaN or infinite values")
                layers_seen.setdefault(record_name, set()).add(key)
                size = len(value.data)
                inventory.append({"record": record_name, "key": key, "kind": "array", "shape": shape, "bytes": size})
            elif isinstance(record, ConfigRecord):
                if key in ("name", "status"):
                    if not isinstance(value, str) or not (NAME.match(value) if key == "name" else value in STATUSES):
                        raise ReplyRejected(f"site.{key} must be {'a short label' if key == 'name' else 'one of ' + str(sorted(STATUSES))}, "
                                            f"got {str(value)[:40]!r}")
                elif key in ("has_model", "labelled"):
                    if not isinstance(value, bool):
                        raise ReplyRejected(f"site.{key} must be true or false")
                else:
                    _scalar(record_name, key, value)
                    if not 0 <= value <= MAX_IMAGES:
                        raise ReplyRejected(f"site.{key}={value} is outside [0, {MAX_IMAGES}]")
                size = len(json.dumps(value))
                inventory.append({"record": record_name, "key": key, "kind": "ConfigRecord", "shape": (1,), "bytes": size})
            else:
                values = _scalar(record_name, key, value)
                if key in COUNT_KEYS and not 0 <= values[0] <= MAX_IMAGES:
                    raise ReplyRejected(f"metrics.{key}={values[0]} is outside [0, {MAX_IMAGES}]: a count no site can have")
                size = len(json.dumps(value))
                inventory.append({"record": record_name, "key": key, "kind": type(record).__name__,
                                  "shape": (len(values),), "bytes": size})
            total += size
            if total > MAX_REPLY_BYTES:
                raise ReplyRejected(f"reply exceeds {MAX_REPLY_BYTES} bytes for variant {variant}")
    for record_name, keys in REQUIRED.get(variant, {}).items():
        if record_name in content and set(content[record_name].keys()) != keys:
            raise ReplyRejected(f"record {record_name} must hold exactly {sorted(keys)}")
    if "metrics" in content:
        m = content["metrics"]
        if "stats_images" in m and m["stats_images"] > m.get("images", 0):
            raise ReplyRejected("metrics.stats_images exceeds metrics.images")
    if channels is not None:
        for record_name, keys in layers_seen.items():
            names = ("sum",) if record_name == "stats" else ("weight", "bias")
            if keys != {f"{i}.{n}" for i in range(len(channels)) for n in names}:
                raise ReplyRejected(f"record {record_name} does not hold exactly the model's {len(channels)} layers")
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
