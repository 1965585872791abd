"""Loaders: correct decoding, and every bad input is an error that names its file (or is skipped and counted)."""
import numpy as np
import pytest
import torch
from PIL import Image

from grata.data import DataError, FundusCSV, ImageFolder, StreamReport, fundus_split, stream

from .conftest import fundus_root


def write_case(root, name, size=40, mask_values=(255, 128, 0)):
    (root / "image").mkdir(parents=True, exist_ok=True)
    (root / "mask").mkdir(parents=True, exist_ok=True)
    rgb = (np.random.default_rng(0).random((size, size, 3)) * 200 + 20).astype(np.uint8)
    Image.fromarray(rgb).save(root / "image" / f"{name}.png")
    mask = np.full((size, size), mask_values[0], np.uint8)
    mask[10:30, 10:30] = mask_values[1]
    mask[15:25, 15:25] = mask_values[2]
    Image.fromarray(mask).save(root / "mask" / f"{name}.png")
    return f"image/{name}.png,mask/{name}.png"


def write_csv(path, rows, header="image,mask"):
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_csv_layout_decodes_disc_and_cup(tmp_path):
    csv = write_csv(tmp_path / "d_test.csv", [write_case(tmp_path, "a")])
    sample = FundusCSV(csv, size=32)[0]
    assert sample.image.shape == (3, 32, 32) and sample.mask.shape == (2, 32, 32)
    assert sample.image.min() == 0 and sample.image.max() == 1  # min-max normalised
    disc, cup = sample.mask
    assert disc.sum() > cup.sum() > 0
    assert torch.all(disc >= cup)  # cup inside disc
    assert set(sample.mask.unique().tolist()) <= {0.0, 1.0}


def test_missing_image_names_the_file(tmp_path):
    csv = write_csv(tmp_path / "d.csv", ["image/ghost.png,mask/ghost.png"])
    with pytest.raises(DataError, match="ghost.png"):
        FundusCSV(csv)[0]


def test_corrupt_image_names_the_file(tmp_path):
    row = write_case(tmp_path, "bad")
    (tmp_path / "image" / "bad.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"cannot decode image .*bad\.png"):
        FundusCSV(write_csv(tmp_path / "d.csv", [row]))[0]


def test_mask_with_unexpected_values_names_the_file(tmp_path):
    row = write_case(tmp_path, "odd", mask_values=(255, 77, 0))
    with pytest.raises(DataError, match=r"odd\.png.*unexpected values \[77\]"):
        FundusCSV(write_csv(tmp_path / "d.csv", [row]))[0]
    assert FundusCSV(tmp_path / "d.csv", strict_mask_values=False)[0].mask[0].sum() > 0


def test_empty_csv_and_missing_csv_are_named(tmp_path):
    with pytest.raises(DataError, match=r"empty\.csv: no rows"):
        FundusCSV(write_csv(tmp_path / "empty.csv", []))
    with pytest.raises(DataError, match=r"nothere\.csv"):
        FundusCSV(tmp_path / "nothere.csv")
    with pytest.raises(DataError, match=r"wrong\.csv.*'image' column"):
        FundusCSV(write_csv(tmp_path / "wrong.csv", ["a,b"], header="x,y"))


def test_folder_errors_and_skip_mode_counts(tmp_path):
    with pytest.raises(DataError, match="holds no images"):
        ImageFolder(tmp_path)
    with pytest.raises(DataError, match="not found"):
        ImageFolder(tmp_path / "missing")
    write_case(tmp_path, "good1")
    write_case(tmp_path, "good2")
    (tmp_path / "image" / "broken.png").write_bytes(b"\x89PNG garbage")
    folder = ImageFolder(tmp_path / "image", size=32)
    with pytest.raises(DataError, match="broken.png"):
        list(stream(folder))
    report = StreamReport()
    names = [s.name for s in stream(folder, on_error="skip", report=report)]
    assert names == ["good1", "good2"] and report.read == 2
    assert len(report.skipped) == 1 and "broken.png" in report.skipped[0]
    assert all(s.mask is None for s in stream(folder, on_error="skip"))


def test_real_fundus_layout_when_present():
    root = fundus_root()
    for domain in ("Drishti_GS", "RIM_ONE_r1", "RIM_ONE_r2", "RIM_ONE_r3"):
        ds = fundus_split(root, domain, "test", size=64)
        sample = ds[0]
        assert sample.image.shape == (3, 64, 64) and sample.mask.shape == (2, 64, 64)
        disc, cup = sample.mask
        assert 0 < cup.sum() < disc.sum() and torch.all(disc >= cup)
    both = fundus_split(root, "RIM_ONE_r1", "all", size=64)
    assert len(both) == 98  # 81 train + 17 test
