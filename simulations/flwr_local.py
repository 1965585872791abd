"""`flwr run .` on this machine, with its true status: `python -m simulations.flwr_local [hydra overrides]`.

Flower's launcher starts a local SuperLink (simulation runtime) by itself. This wrapper
  - keeps Flower's home in .flwr/ of this checkout, with a federation of len(data.sites) simulated
    sites at 1 CPU each (config.toml);
  - disables the SuperLink's per-run `uv sync` of the app's dependencies (this venv has them);
  - passes the overrides and this directory as the run config;
  - reads the run's final status with `flwr ls` (`flwr run --stream` exits 0 even when the run failed)
    and exits non-zero unless it is finished:completed;
  - stops the local SuperLink it started.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from server.config import load_config
from simulations.flwr_cli import ROOT, run_federation



def federation_toml(sites: int) -> str:
    return f"""[superlink]
default = "local"

[superlink.local]
address = ":local:"
options.num-supernodes = {sites}
options.backend.client-resources.num-cpus = 1
options.backend.client-resources.num-gpus = 0
options.backend.init-args.num-cpus = {min(sites, os.cpu_count() or 1)}
options.backend.init-args.logging-level = "ERROR"
"""


def stop_local_superlink() -> None:
    out = subprocess.run(["pgrep", "-f", "flower-superlink.*--simulation"], capture_output=True, text=True)
    for pid in out.stdout.split():
        os.kill(int(pid), signal.SIGTERM)


def main(overrides: list[str]) -> int:
    cfg = load_config(overrides)  # a bad override fails here, before anything starts
    home = ROOT / ".flwr"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(federation_toml(len(cfg.data.sites)))
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    try:
        run_id, status, output = run_federation("local", overrides, env)
        print(output[-12000:])
        if run_id is None:
            print("flwr run did not report a run id", file=sys.stderr)
            return 2
        print(f"run {run_id}: {status}")
        return 0 if status == "finished:completed" else 1
    finally:
        stop_local_superlink()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
