"""One Ctrl-C stops a run at once, marks its MLflow runs KILLED and prints the command that resumes it;
resume reads the saved configuration (overrides optional, a mismatch names the differing keys)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from server.config import load_config
from simulations.run import resume_config, simulate

from tests.conftest import SIZE

ROOT = Path(__file__).resolve().parents[1]


# Loaded into the run's process: once round 1 is reported, the run waits (at most 5 minutes) for the
# test's Ctrl-C, so the signal lands in round 2 however late this test reads the line. Without it, a
# loaded machine let the whole run finish before the signal arrived.
WAIT_AFTER_ROUND_1 = """
import time
import grata.progress as progress
_write = progress.Progress.write
def write(self, line):
    _write(self, line)
    if line.lstrip().startswith("round 1/"):
        time.sleep(300)
progress.Progress.write = write
"""


def launch(tmp_path, checkpoint, *overrides):
    args = [sys.executable, "-m", "simulations.run", "engine=inline", f"hydra.run.dir={tmp_path}/hydra", *overrides]
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(WAIT_AFTER_ROUND_1)
    env = {**os.environ, "PYTHONPATH": f"{hook}{os.pathsep}{ROOT}", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def tiny(tmp_path, checkpoint):
    return [f"data.size={SIZE}", "data.synthetic_test=24", "data.sites=[colour_cast,gamma]", "model.encoder=resnet18",
            "model.decoder_width=16", f"checkpoint={checkpoint}", "federation.rounds=2", "mlflow.overlays=0",
            f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"out_dir={tmp_path}/runs"]


def test_one_ctrl_c_stops_marks_killed_and_says_how_to_resume(tmp_path, checkpoint):
    proc = launch(tmp_path, checkpoint, *tiny(tmp_path, checkpoint))
    lines = []
    for line in proc.stdout:  # wait for round 1 to finish: round 2 is then running
        lines.append(line)
        if "round 1/2" in line:
            proc.send_signal(signal.SIGINT)
            break
    else:
        raise AssertionError("the run ended before round 1 was reported:\n" + "".join(lines))
    t0 = time.monotonic()
    rest, _ = proc.communicate(timeout=120)
    stopped_s = time.monotonic() - t0
    out = "".join(lines) + rest
    assert proc.returncode == 130, out
    assert stopped_s < 60, f"one Ctrl-C took {stopped_s:.0f} s to stop"
    assert "run folder:" in out
    resume_line = next(line for line in out.splitlines() if line.startswith("continue with: python -m simulations.run resume="))
    run_dir = resume_line.split("resume=", 1)[1].strip()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and {r.info.status for r in runs} == {"KILLED"}
    assert "Traceback" not in out

    with pytest.raises(ValueError, match=r"federation.rounds: saved 2, given 3") as err:
        resume_config(load_config(["engine=inline", f"resume={run_dir}", "federation.rounds=3", "seed=0"]),
                      ["engine=inline", f"resume={run_dir}", "federation.rounds=3", "seed=0"], tmp_path)
    assert "seed" not in str(err.value)  # an override that agrees with the saved run is fine

    cfg = resume_config(load_config(["engine=inline", f"resume={run_dir}"]), [f"resume={run_dir}"], tmp_path)
    assert cfg.data.synthetic_test == 24 and cfg.federation.rounds == 2  # the saved run's, not the defaults
    result = simulate(cfg, tmp_path)  # no overrides: continues the saved run in this process
    assert all(site["rounds"] == 2 for site in result["sites"].values())
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert {r.info.status for r in runs} == {"FINISHED"}
