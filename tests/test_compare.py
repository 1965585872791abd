"""simulations.compare: a source row, the disc/cup split, one MLflow group per comparison."""
from __future__ import annotations

import re
from pathlib import Path

from mlflow.tracking import MlflowClient

from simulations.compare import compare
from tests.conftest import tiny_config


def test_compare_has_a_source_row_disc_cup_split_and_one_mlflow_group(tmp_path, checkpoint, capsys):
    cfg = tiny_config(tmp_path, checkpoint, "federation.rounds=1", "variants=[local_only,fed_affine]")
    results = compare(cfg, tmp_path)
    out = capsys.readouterr().out
    table = out[out.index("Dice x100, mean (disc/cup)"):]
    rows = {line.split()[0]: line for line in table.splitlines()[3:6]}
    assert list(rows) == ["source", "local_only", "fed_affine"]
    assert re.search(r"\d+\.\d\d \(\d+\.\d/\d+\.\d\)", rows["source"])  # mean (disc/cup) per cell
    folder = Path(results["local_only"]["run_dir"]).parent
    assert (folder / "compare.png").is_file() and "source" in (folder / "compare.csv").read_text()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("fedgrata").experiment_id])
    assert {r.data.tags["fedgrata.variant"] for r in runs} == {"source", "local_only", "fed_affine"}
    assert {r.data.tags["fedgrata.compare"] for r in runs} == {folder.name}
    assert sorted(r.info.run_name for r in runs) == sorted(f"{v} {folder.name}" for v in ("source", "local_only", "fed_affine"))


def test_hydra_multirun_ends_in_the_same_comparison(tmp_path, checkpoint):
    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf

    from server.config import resolved
    from simulations.compare import CompareCallback
    from tests.conftest import run_tiny

    callback = CompareCallback()
    for variant in ("local_only", "fed_affine"):  # what each multirun job returns (simulations.run's main)
        result, _ = run_tiny(tmp_path, checkpoint, f"federation={variant}", "federation.rounds=1")
        job = JobReturn()
        job.status, job.return_value = JobStatus.COMPLETED, result
        callback.on_job_end(OmegaConf.create({}), job)
    cfg = tiny_config(tmp_path, checkpoint, "federation.rounds=1")
    sweep = tmp_path / "multirun" / "compare-test"
    config = OmegaConf.create({**resolved(cfg), "hydra": {"runtime": {"cwd": str(tmp_path)}, "sweep": {"dir": str(sweep)}}})
    callback.on_multirun_end(config)
    table = (sweep / "compare.txt").read_text().splitlines()
    assert [line.split()[0] for line in table[3:6]] == ["source", "local_only", "fed_affine"]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("fedgrata").experiment_id])
    assert any(r.info.run_name == "source compare-test" for r in runs)


def test_summary_json_is_the_image_weighted_stream_figure(tmp_path, checkpoint):
    """summary.json holds, per variant, each site's stream Dice and their image-weighted mean, and the
    mean recomputes from those figures and compare.json's image counts."""
    import json

    from simulations.compare import summary

    cfg = tiny_config(tmp_path, checkpoint, "federation.rounds=1", "variants=[local_only]")
    results = compare(cfg, tmp_path)
    folder = Path(results["local_only"]["run_dir"]).parent
    written = json.loads((folder / "summary.json").read_text())
    counts = json.loads((folder / "compare.json").read_text())["local_only"]["sites"]
    entry = written["variants"]["local_only"]
    assert set(written) == {"variants"} and set(entry) == {"dice_mean", "sites"}
    assert set(entry["sites"]) == set(cfg.data.sites)
    recomputed = sum(d * counts[s]["images"] for s, d in entry["sites"].items()) / sum(counts[s]["images"] for s in entry["sites"])
    assert abs(entry["dice_mean"] - recomputed) < 1e-9
    # unequal streams: the mean weighs images, not sites (a plain site mean would be 50)
    uneven = summary({"v": {"sites": {"a": {"dice_mean": 80.0, "images": 30}, "b": {"dice_mean": 20.0, "images": 10}}}})
    assert uneven == {"variants": {"v": {"dice_mean": 65.0, "sites": {"a": 80.0, "b": 20.0}}}}
