"""Flower's CLI from Python, with the run's true status (`flwr run --stream` exits 0 even on failure)."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def flwr(*args: str, env: dict, timeout: float | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], cwd=ROOT, env=env, text=True, capture_output=True,
                          timeout=timeout, check=False)


def run_federation(connection: str, overrides: list[str], env: dict, timeout: float | None = None
                   ) -> tuple[str | None, str, str]:
    """`flwr run .` on `connection` with the Hydra overrides and this checkout as base-dir.

    Returns (run id or None, final status as `flwr ls` reports it, the run's streamed output).
    """
    run_config = f"overrides={json.dumps(shlex.join(overrides))} base-dir={json.dumps(str(ROOT))}"
    out = flwr("run", ".", connection, "--run-config", run_config, "--stream", env=env, timeout=timeout)
    output = out.stdout + out.stderr
    ids = re.findall(r"run\s*(?:ID)?[:\s]+(\d{6,})", output, flags=re.I)
    if not ids:
        return None, "unknown", output
    status = "unknown"
    for _ in range(60):  # the status settles shortly after the stream ends
        found = re.findall(r'"status"\s*:\s*"([^"]+)"',
                           flwr("ls", connection, "--run-id", ids[-1], "--format", "json", env=env).stdout)
        status = found[0] if found else status
        if status.startswith("finished"):
            break
        time.sleep(1)
    return ids[-1], status, output


__all__ = ["BIN", "ROOT", "flwr", "run_federation"]
