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

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from server.config import load_config

ROOT = Path(__file__).resolve().parent.parent


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


def flwr(*args: str, env: dict, capture: bool = False) -> subprocess.CompletedProcess:
    exe = str(Path(sys.executable).with_name("flwr"))
    return subprocess.run([exe, *args], cwd=ROOT, env=env, text=True, check=False,
                          capture_output=capture)


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
    run_config = f"overrides={json.dumps(shlex.join(overrides))} base-dir={json.dumps(str(ROOT))}"
    try:
        started = flwr("run", ".", "local", "--run-config", run_config, "--stream", env=env, capture=True)
        print(started.stdout[-8000:], started.stderr[-4000:], sep="\n")
        ids = re.findall(r"run\s*(?:ID)?[:\s]+(\d{6,})", started.stdout + started.stderr, flags=re.I)
        if not ids:
            print("flwr run did not report a run id", file=sys.stderr)
            return 2
        run_id = ids[-1]
        for _ in range(60):  # the status settles shortly after the stream ends
            listing = flwr("ls", "local", "--run-id", run_id, "--format", "json", env=env, capture=True)
            status = re.findall(r'"status"\s*:\s*"([^"]+)"', listing.stdout)
            if status and status[0].startswith("finished"):
                break
            time.sleep(1)
        final = status[0] if status else "unknown"
        print(f"run {run_id}: {final}")
        return 0 if final == "finished:completed" else 1
    finally:
        stop_local_superlink()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
