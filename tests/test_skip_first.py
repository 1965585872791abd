"""data.on_error=skip must protect a site whose first image (in name order) is the corrupt one."""
from __future__ import annotations

import numpy as np
from PIL import Image

from client.client_app import app as client_app
from grata.data import ImageFolder, first_readable
from server.federation import federate
from tests.conftest import RecordingGrid, partner_node, tiny_config


def _folder(tmp_path):
    folder = tmp_path / "site_images"
    folder.mkdir()
    (folder / "a_first.png").write_bytes(b"not a png at all")  # sorts first: the site's introduction reads it
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


def test_first_readable_follows_the_skip_rule(tmp_path):
    ds = ImageFolder(_folder(tmp_path), size=16)
    assert first_readable(ds, "skip").name == "img0"
    try:
        first_readable(ds, "raise")
    except ValueError as exc:
        assert "a_first.png" in str(exc)
    else:
        raise AssertionError("on_error=raise must raise on the corrupt first image")


def test_a_corrupt_first_image_is_skipped_and_counted(tmp_path, checkpoint):
    folder = _folder(tmp_path)
    cfg = tiny_config(tmp_path, checkpoint, "data.on_error=skip", "federation.rounds=1", "data.sites=[partner]")
    node = partner_node(tmp_path, folder, checkpoint)
    grid = RecordingGrid(client_app, [node])
    result = federate(grid, cfg, tmp_path)
    metrics = dict(grid.replies[0].content["metrics"])
    assert metrics["images"] == 3 and metrics["skipped"] == 1  # the site joined, the bad file was counted
    assert result["sites"]["partner"]["images"] == 3
