"""Hospitals that share a device: one domain's images split into disjoint, reproducible hospitals.

A site named `<domain>-<letter>` (`Drishti_GS-a`, `gamma-c`) is one hospital of that domain's kind.
  fundus / folder  the domain's images are shuffled once with a generator seeded by (data.seed, domain)
                   and dealt round-robin into as many parts as `data.sites` names hospitals of that
                   domain; hospital `a` holds part 0, `b` part 1, ... in the domain's own order. The
                   parts are disjoint and together hold every image.
  synthetic        every named domain already renders its own images (grata/synthetic.py seeds by the
                   name), so `gamma-a` and `gamma-b` are disjoint by construction, each with
                   data.synthetic_test images of the `gamma` style.
"""
from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

HOSPITAL = re.compile(r"^(?P<base>.+)-(?P<part>[a-z])$")


def hospital(name: str) -> tuple[str, int | None]:
    """`Drishti_GS-b` -> ("Drishti_GS", 1); a name without a letter suffix -> (name, None)."""
    m = HOSPITAL.match(name)
    if m is None:
        return name, None
    return m["base"], ord(m["part"]) - ord("a")


def kind_of(name: str) -> str:
    """What sites of one kind share (a device, an acquisition style): the name without its hospital
    letter or synthetic copy number (`gamma-a`, `gamma-2` -> `gamma`)."""
    base, part = hospital(name)
    if part is not None:
        return base
    head, dash, k = name.rpartition("-")
    return head if dash and k.isdigit() else name


def split_indices(n: int, parts: int, part: int, key: str, seed: int = 0) -> list[int]:
    """The image indices of hospital `part` of `parts` out of n images, in the domain's order.

    A permutation of range(n) drawn from a generator seeded by (seed, key), dealt round-robin."""
    if not 0 <= part < parts or n < parts:
        raise ValueError(f"{key}: hospital {chr(ord('a') + part)} of {parts} cannot be cut from {n} images")
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{key}".encode()))
    perm = torch.randperm(n, generator=g).tolist()
    return sorted(perm[part::parts])


def hospitals_of(base: str, sites: Sequence[str]) -> list[str]:
    """The configured sites that are hospitals of domain `base`, in letter order."""
    return sorted((s for s in sites if hospital(s)[0] == base and hospital(s)[1] is not None),
                  key=lambda s: hospital(s)[1])


class Hospital(torch.utils.data.Dataset):
    """One hospital's images: a fixed subset of a domain's dataset (indices from split_indices)."""

    def __init__(self, dataset, indices: Sequence[int], name: str) -> None:
        self.dataset, self.indices, self.name = dataset, list(indices), name

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.dataset[self.indices[i]]


def open_hospital(name: str, sites: Sequence[str], open_base, split: str, seed: int = 0) -> Hospital:
    """Hospital `name` (`<domain>-<letter>`) among `sites`; open_base(domain) -> the whole domain's dataset."""
    base, part = hospital(name)
    if part is None:
        raise ValueError(f"site {name!r} is not a hospital name (<domain>-<letter>)")
    siblings = hospitals_of(base, sites)
    if name not in siblings:
        raise ValueError(f"site {name!r} is not among data.sites {list(sites)}: the number of hospitals of "
                         f"{base} comes from that list")
    letters = [hospital(s)[1] for s in siblings]
    if letters != list(range(len(letters))):
        raise ValueError(f"hospitals of {base} must be lettered a, b, c, ... without gaps: {siblings}")
    whole = open_base(base)
    return Hospital(whole, split_indices(len(whole), len(siblings), part, f"{base}/{split}", seed), name)


__all__ = ["HOSPITAL", "Hospital", "hospital", "hospitals_of", "kind_of", "open_hospital", "split_indices"]


# --- scenarios: which hospitals a comparison runs, per data kind (conf/scenario/*.yaml) ---------------
@dataclass
class KindSites:
    """A scenario's hospitals for one data kind."""
    sites: list[str] = field(default_factory=list)
    site_split: str = ""  # "" keeps data.site_split
    images: int = 0  # synthetic: images per hospital (data.synthetic_test); 0 keeps it
    rounds: int = 0  # 0 keeps federation.rounds
    join_round: dict[str, int] = field(default_factory=dict)  # site -> the round it joins in (late joiners); others: 1

    def __post_init__(self) -> None:
        unknown = sorted(set(self.join_round) - set(self.sites))
        if unknown or any(r < 1 for r in self.join_round.values()):
            raise ValueError(f"scenario join_round {self.join_round}: every key must be one of its sites "
                             f"{self.sites} (not {unknown}) and every round >= 1")


@dataclass
class ScenarioConfig:
    """`scenario=NAME`: the hospitals for each data kind; "" name = data.sites as configured."""
    name: str = ""
    synthetic: KindSites = field(default_factory=KindSites)
    fundus: KindSites = field(default_factory=KindSites)

    def for_kind(self, kind: str) -> KindSites:
        chosen = getattr(self, kind, None) if kind in ("synthetic", "fundus") else None
        if chosen is None or not chosen.sites:
            raise ValueError(f"scenario={self.name}: no hospitals for data.kind={kind} "
                             f"(conf/scenario/{self.name}.yaml lists synthetic and fundus)")
        return chosen


__all__ += ["KindSites", "ScenarioConfig"]
