"""What may travel between a site and the coordinator, and the one audit both sides run. No Flower here.

A reply is a plain dict of records, {record name: {key: value}} (wire/ converts it to and from
Flower's RecordDict):
  "site"     name (the configured site label) and status (from a closed set)
  "metrics"  numbers: counts, the proxy, the alignment summary, ...; which ones is the variant's list
  "privacy"  numbers: ledger epsilon, delta, noise stds, whether released (private variants)
  <arrays>   per-layer records {"<layer>.<name>": tensor [k x C_layer]}: e.g. fed_stats "stats",
             fed_affine "affine"; declared by the variant with `PerLayer`
Each variant (grata/federation/strategies/) declares its records and keys; `audit` checks a reply
against that declaration: the site before sending (fail closed), the coordinator before using it.
Every array is one-dimensional and per channel; nothing image-sized fits, and a reply is capped at
MAX_REPLY_BYTES whatever a variant declares.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch

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
    "align_cos_mean", "align_cos_std", "align_cos_hist", "align_neg_share", "lr_mean", "entropy", "consistency",
    "geo_cropped_share", "geo_zoom"}  # the crop protocol (grata/geometry.py crop_summary): plain variants only
# metrics with a fixed range, and why no honest site leaves it: a value outside is a lying or broken site
# (the crop's zoom is frame side / crop side: at least 1 / 1.5 (keep_whole's largest crop), at most 64
# (a crop of under 2 % of the side))
RANGES = {**{k: (0, MAX_IMAGES, "a count no site can have") for k in COUNT_KEYS},
          "geo_cropped_share": (0.0, 1.0, "a share"), "geo_zoom": (0.5, 64.0, "a crop no geometry step makes")}
PRIVATE_METRICS = COUNT_KEYS | DICE_KEYS | {"dice_proxy"}  # the proxy arrives noised (grata/privacy.py)
LISTS = {"align_cos_hist": COSINE_BINS}  # the only list-valued metric, and its exact length
PRIVACY_KEYS = {"dp_epsilon", "dp_delta", "dp_noise_std", "dp_proxy_std", "dp_released"}
SITE_KEYS = {"name", "status"}
INTRO_KEYS = {"name", "status", "has_model", "images_total", "labelled"}
CONFIG_RECORDS = {"site"}  # records of words (Flower ConfigRecord); array records are declared PerLayer; the rest numbers


@dataclass(frozen=True)
class PerLayer:
    """An array record of per-channel vectors: key "<layer>.<name>" for every BN layer 0..L-1 and every
    name, each `per_channel` x C_layer long (e.g. stats: ("sum",), 2: first and second moments)."""
    names: tuple[str, ...]
    per_channel: int = 1

    def match(self, key: str) -> int | None:
        """The layer index of a key of this record, or None if the key does not belong here."""
        m = re.match(r"^(\d{1,3})\.([a-z0-9_]{1,16})$", key)
        return int(m.group(1)) if m and m.group(2) in self.names else None


Rules = Mapping[str, "set[str] | PerLayer"]  # record name -> allowed keys, or an array record's layout
INTRO: Rules = {"site": INTRO_KEYS}  # a site's introduction (query), the same for every variant


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


def _array(record_name: str, key: str, value: Any, rule: PerLayer, channels: list[int] | None) -> tuple[int, int]:
    """Check one array; returns (its layer, its bytes)."""
    if not isinstance(value, torch.Tensor):
        raise ReplyRejected(f"{record_name}.{key} must be an array, got {type(value).__name__}")
    shape, layer = tuple(value.shape), rule.match(key)
    if len(shape) != 1 or shape[0] > 2 * MAX_CHANNELS or layer >= MAX_LAYERS:
        raise ReplyRejected(f"array {record_name}.{key} has shape {shape}: only per-channel vectors may leave a site")
    if channels is not None and (layer >= len(channels) or shape[0] != rule.per_channel * channels[layer]):
        raise ReplyRejected(f"array {record_name}.{key} has shape {shape}, not the model's layer {layer}")
    if not value.is_floating_point() or not torch.isfinite(value).all():
        raise ReplyRejected(f"array {record_name}.{key} holds NaN, infinite or non-float values")
    return layer, value.numel() * value.element_size()


def _word(key: str, value: Any) -> None:
    """A value of the site record: the closed words, booleans, or counts."""
    if key in ("name", "status"):
        if not isinstance(value, str) or not (NAME.match(value) if key == "name" else value in STATUSES):
            raise ReplyRejected(f"site.{key} must be {'a short label' if key == 'name' else 'one of ' + str(sorted(STATUSES))}, "
                                f"got {str(value)[:40]!r}")
    elif key in ("has_model", "labelled"):
        if not isinstance(value, bool):
            raise ReplyRejected(f"site.{key} must be true or false")
    else:
        _scalar("site", key, value)
        if not 0 <= value <= MAX_IMAGES:
            raise ReplyRejected(f"site.{key}={value} is outside [0, {MAX_IMAGES}]")


def audit(reply: Mapping[str, Mapping[str, Any]], allowed: Rules, required: Rules | None = None,
          channels: list[int] | None = None, label: str = "this variant") -> list[dict[str, Any]]:
    """Check a reply against `allowed`; returns its inventory (record, key, kind, shape, bytes).

    Exact: only the allowed records and keys, every metric one finite number except the named
    fixed-length lists, counts within MAX_IMAGES, the site's words from a closed set, arrays per
    channel (with `channels` [C_l per BN layer]: exactly layers 0..L-1, each of its exact length),
    records in `required` holding exactly their keys, and the whole reply under MAX_REPLY_BYTES.
    Raises ReplyRejected on anything else.
    """
    inventory, total, seen = [], 0, {}
    for record_name, record in reply.items():
        if record_name not in allowed:
            raise ReplyRejected(f"record {record_name!r} is not allowed for {label}")
        rule = allowed[record_name]
        for key, value in record.items():
            if not (rule.match(key) is not None if isinstance(rule, PerLayer) else key in rule):
                raise ReplyRejected(f"key {record_name}.{key} is not allowed for {label}")
            if isinstance(rule, PerLayer):
                layer, size = _array(record_name, key, value, rule, channels)
                seen.setdefault(record_name, set()).add(key)
                item = {"kind": "array", "shape": tuple(value.shape)}
            elif record_name in CONFIG_RECORDS:
                _word(key, value)
                size, item = len(json.dumps(value)), {"kind": "ConfigRecord", "shape": (1,)}
            else:
                values = _scalar(record_name, key, value)
                if key in RANGES and not RANGES[key][0] <= values[0] <= RANGES[key][1]:
                    lo, hi, why = RANGES[key]
                    raise ReplyRejected(f"{record_name}.{key}={values[0]} is outside [{lo}, {hi}]: {why}")
                size, item = len(json.dumps(value)), {"kind": "MetricRecord", "shape": (len(values),)}
            inventory.append({"record": record_name, "key": key, **item, "bytes": size})
            total += size
            if total > MAX_REPLY_BYTES:
                raise ReplyRejected(f"reply exceeds {MAX_REPLY_BYTES} bytes for {label}")
    for record_name, keys in (required or {}).items():
        if record_name in reply and set(reply[record_name].keys()) != keys:
            raise ReplyRejected(f"record {record_name} must hold exactly {sorted(keys)}")
    m = reply.get("metrics", {})
    if "stats_images" in m and m["stats_images"] > m.get("images", 0):
        raise ReplyRejected("metrics.stats_images exceeds metrics.images")
    if channels is not None:
        for record_name, keys in seen.items():
            names = allowed[record_name].names
            if keys != {f"{i}.{n}" for i in range(len(channels)) for n in names}:
                raise ReplyRejected(f"record {record_name} does not hold exactly the model's {len(channels)} layers")
    return inventory


# --- per-layer tensors <-> array records ------------------------------------------------------------
def layer_arrays(layers: list[tuple[torch.Tensor, ...]], names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Per layer a tuple of [C]-ish tensors -> {"<layer>.<name>": float32 tensor}."""
    return {f"{i}.{n}": t.detach().float().contiguous() for i, ts in enumerate(layers) for n, t in zip(names, ts)}


def layer_tensors(arrays: Mapping[str, torch.Tensor], names: tuple[str, ...]) -> list[tuple[torch.Tensor, ...]]:
    """{"<layer>.<name>": tensor} -> per layer, in layer order, a tuple of tensors (one per name)."""
    layers = sorted({int(k.split(".")[0]) for k in arrays if k.split(".")[0].isdigit()})
    if layers != list(range(len(layers))):
        raise ReplyRejected(f"layers {layers} are not numbered 0..{len(layers) - 1}")
    try:
        return [tuple(arrays[f"{i}.{n}"] for n in names) for i in layers]
    except KeyError as exc:
        raise ReplyRejected(f"missing array {exc}") from exc


NOT_SENT = {"skipped", "status"}  # what a site's round result keeps for itself (skipped file names), or sends as a word


def reply_records(name: str, out: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A Site.run_round result -> the reply's records: the site's words, then every record it made."""
    reply = {"site": {"name": name, "status": out.get("status", "ok")}}
    reply.update({k: dict(v) for k, v in out.items() if k not in NOT_SENT})
    return reply


__all__ = ["INTRO", "MAX_IMAGES", "MAX_REPLY_BYTES", "PLAIN_METRICS", "PRIVACY_KEYS", "PRIVATE_METRICS", "PerLayer",
           "ReplyRejected", "Rules", "SITE_KEYS", "audit", "layer_arrays", "layer_tensors", "reply_records"]
