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
