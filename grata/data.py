"""Fundus image sources: the benchmark CSV layout and a hospital's unlabeled folder.

Every source yields `Sample`s: image float [3, S, S] min-max normalised to [0, 1] and, when labels
exist, mask float [2, S, S] (channel 0 = disc incl. cup, channel 1 = cup). Files are decoded lazily,
so a folder of thousands of images costs nothing until it is read. Problems raise `DataError`
naming the file; `stream(..., on_error="skip")` skips such files and counts them instead.
"""
from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
MASK_VALUES = (0, 128, 255)  # documented layout: cup, disc rim, background


class DataError(ValueError):
    """A problem with one input file or folder; the message names it."""


@dataclass
class Sample:
    image: torch.Tensor  # float [3, S, S] in [0, 1]
    mask: torch.Tensor | None  # float {0,1} [2, S, S] or None (unlabeled)
    name: str


def minmax(image: torch.Tensor) -> torch.Tensor:
    """Per-image min-max over all channels: [..., 3, H, W] -> same shape in [0, 1]."""
    flat = image.flatten(-3)
    lo = flat.min(-1).values[..., None, None, None]
    hi = flat.max(-1).values[..., None, None, None]
    return (image - lo) / (hi - lo).clamp_min(1e-8)


def decode_mask(grey: np.ndarray, path: Path | str, strict_values: bool = True) -> torch.Tensor:
    """Grey mask [H, W] uint8 (255 background, <255 disc, 0 cup) -> float [2, H, W]."""
    if grey.ndim != 2:
        raise DataError(f"mask {path}: expected a single-channel grey image, got shape {grey.shape}")
    if strict_values:
        unexpected = np.setdiff1d(np.unique(grey), MASK_VALUES)
        if unexpected.size:
            raise DataError(f"mask {path}: unexpected values {unexpected[:5].tolist()} (allowed {list(MASK_VALUES)})")
    t = torch.from_numpy(grey)
    return torch.stack([t < 255, t == 0]).float()


def read_image(path: Path, size: int) -> torch.Tensor:
    try:
        with Image.open(path) as im:
            rgb = np.array(im.convert("RGB"), dtype=np.float32)
    except FileNotFoundError as exc:
        raise DataError(f"image not found: {path}") from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"cannot decode image {path}: {exc}") from exc
    t = torch.from_numpy(rgb).permute(2, 0, 1)[None]
    if t.shape[-2:] != (size, size):
        t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return minmax(t[0])


def read_mask(path: Path, size: int, strict_values: bool = True) -> torch.Tensor:
    try:
        with Image.open(path) as im:
            grey = np.array(im.convert("L") if im.mode not in ("L", "P") else im)
    except FileNotFoundError as exc:
        raise DataError(f"mask not found: {path}") from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"cannot decode mask {path}: {exc}") from exc
    mask = decode_mask(grey, path, strict_values)
    if mask.shape[-2:] != (size, size):
        mask = F.interpolate(mask[None], size=(size, size), mode="nearest")[0]
    return mask


class FundusCSV(torch.utils.data.Dataset):
    """A domain split in the benchmark layout: a CSV with columns image,mask relative to `root`."""

    def __init__(self, csv_path: str | Path, size: int = 256, root: str | Path | None = None, strict_mask_values: bool = True):
        self.csv_path = Path(csv_path)
        self.root = Path(root) if root is not None else self.csv_path.parent
        self.size, self.strict = size, strict_mask_values
        if not self.csv_path.is_file():
            raise DataError(f"CSV not found: {self.csv_path}")
        with self.csv_path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or "image" not in reader.fieldnames:
                raise DataError(f"{self.csv_path}: needs a header with an 'image' column (and 'mask' for labels)")
            self.rows = [(r["image"], r.get("mask") or None) for r in reader]
        if not self.rows:
            raise DataError(f"{self.csv_path}: no rows")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Sample:
        image_rel, mask_rel = self.rows[i]
        image = read_image(self.root / image_rel, self.size)
        mask = read_mask(self.root / mask_rel, self.size, self.strict) if mask_rel else None
        return Sample(image, mask, Path(image_rel).stem)


class ImageFolder(torch.utils.data.Dataset):
    """A site's unlabeled images: every image file directly in `folder`, in name order."""

    def __init__(self, folder: str | Path, size: int = 256):
        self.folder, self.size = Path(folder), size
        if not self.folder.is_dir():
            raise DataError(f"image folder not found: {self.folder}")
        self.paths = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.paths:
            raise DataError(f"image folder {self.folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Sample:
        return Sample(read_image(self.paths[i], self.size), None, self.paths[i].stem)


@dataclass
class StreamReport:
    read: int = 0
    skipped: list[str] = field(default_factory=list)  # "name: reason"


def stream(dataset: Sequence[Sample], on_error: str = "raise", report: StreamReport | None = None,
           indices: Sequence[int] | None = None) -> Iterator[Sample]:
    """Yield samples in order; with on_error="skip", bad files are counted in `report` and passed over."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error={on_error!r}: choose 'raise' or 'skip'")
    report = report if report is not None else StreamReport()
    for i in indices if indices is not None else range(len(dataset)):
        try:
            sample = dataset[i]
        except DataError as exc:
            if on_error == "raise":
                raise
            report.skipped.append(str(exc))
            continue
        report.read += 1
        yield sample


def first_readable(dataset: Sequence[Sample], on_error: str = "raise") -> Sample | None:
    """The first sample `stream` would yield under the same skip rule (None when every file is bad).

    Anything that peeks at a dataset (does it hold labels?) must use this, not dataset[0]: with
    on_error="skip" a corrupt first file must not decide for, or stop, the whole site."""
    return next(stream(dataset, on_error), None)


def fundus_split(root: str | Path, domain: str, split: str, size: int = 256) -> FundusCSV:
    """`split` is train, test or all (train then test: the paper adapts on every image of a target)."""
    root = Path(root)
    if split == "all":
        parts = [FundusCSV(root / f"{domain}_{s}.csv", size) for s in ("train", "test")]
        return torch.utils.data.ConcatDataset(parts)  # type: ignore[return-value]
    if split not in ("train", "test"):
        raise DataError(f"split={split!r}: choose train, test or all")
    return FundusCSV(root / f"{domain}_{split}.csv", size)
