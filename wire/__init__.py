"""Flower's records <-> the plain replies of grata/federation/protocol.py, for both sides.

client/ and server/ never import each other; what both need to put a reply on the wire or read one
off it is here: `to_plain` (RecordDict -> {record: {key: value}}, arrays as torch tensors),
`to_records` (back) and `audit` (a RecordDict checked against a variant's allowed list, by name).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from grata.federation.protocol import CONFIG_RECORDS, INTRO, ReplyRejected
from grata.federation.protocol import audit as audit_plain
from grata.federation.strategies import get_strategy


def to_plain(content: RecordDict) -> dict[str, dict[str, Any]]:
    """Every record as {key: value}; arrays as CPU tensors (a site's arrays that do not convert are refused)."""
    out: dict[str, dict[str, Any]] = {}
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            arrays = {}
            for key, array in record.items():
                try:
                    arrays[key] = torch.from_numpy(array.numpy().copy())
                except Exception as exc:  # noqa: BLE001 - anything a lying site could put in an Array
                    raise ReplyRejected(f"array {name}.{key} cannot be read as numbers: {exc}") from exc
            out[name] = arrays
        else:
            out[name] = dict(record)
    return out


def to_records(plain: Mapping[str, Mapping[str, Any]], config: frozenset[str] = frozenset(CONFIG_RECORDS)) -> RecordDict:
    """The reverse: records of tensors -> ArrayRecord, the `config` records -> ConfigRecord, others -> MetricRecord."""
    content = RecordDict()
    for name, items in plain.items():
        if name in config:
            content[name] = ConfigRecord(dict(items))
        elif items and all(isinstance(v, torch.Tensor) for v in items.values()):
            content[name] = ArrayRecord({k: v.detach().contiguous() for k, v in items.items()})
        else:
            content[name] = MetricRecord(dict(items))
    return content


def audit(content: RecordDict, variant: str, channels: list[int] | None = None) -> list[dict[str, Any]]:
    """A Flower reply checked against `variant`'s allowed list ("query": a site's introduction)."""
    plain = to_plain(content)
    if variant == "query":
        return audit_plain(plain, INTRO, channels=channels, label="an introduction")
    try:
        strategy = get_strategy(variant)
    except ValueError as exc:
        raise ReplyRejected(str(exc)) from None
    return audit_plain(plain, strategy.allowed, strategy.required, channels, label=f"variant {variant}")


__all__ = ["audit", "to_plain", "to_records"]
