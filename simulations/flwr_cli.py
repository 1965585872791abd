"""Flower's CLI from Python, through its JSON output (no scraping of text meant for people).

`flwr run . <connection> --format json` starts the run and answers its run id; `flwr log <id> --stream`
shows the run's log live; `flwr ls --run-id <id> --format json` gives its true final status
(`flwr run --stream` exits 0 even when the run failed).
"""
from __future__ import annotations

import json
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


def json_of(text: str) -> dict:
    """The JSON document a `--format json` command printed (Flower may print notices before it)."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise ValueError(f"no JSON in Flower's output: {text[-500:]!r}")
    return json.loads(text[start:end + 1])


def run_status(connection: str, run_id: str, env: dict) -> str:
    """The run's status as `flwr ls --run-id --format json` reports it (e.g. finished:completed)."""
    out = flwr("ls", connection, "--run-id", run_id, "--format", "json", env=env, timeout=60)
    try:
        runs = json_of(out.stdout).get("runs", [])
    except ValueError:
        return "unknown"
    return next((str(r.get("status")) for r in runs if str(r.get("run-id")) == str(run_id)), "unknown")


def run_federation(connection: str, overrides: list[str], env: dict, timeout: float | None = None,
                   federation_config: str | None = None, echo: bool = False) -> tuple[str | None, str, str]:
    """`flwr run .` on `connection` with the Hydra overrides and this checkout as base-dir, its log
    streamed (to the console too when `echo`), and its final status.

    Returns (run id or None, final status as `flwr ls` reports it, the run's output).
    """
    run_config = f"overrides={json.dumps(shlex.join(overrides))} base-dir={json.dumps(str(ROOT))}"
    args = ["run", ".", connection, "--run-config", run_config, "--format", "json"]
    if federation_config:
        args += ["--federation-config", federation_config]
    started = flwr(*args, env=env, timeout=120)
    output = started.stdout + started.stderr
    try:
        reply = json_of(started.stdout)
    except ValueError:
        return None, "unknown", output
    run_id = reply.get("run-id")
    if not reply.get("success") or not run_id:
        return None, "unknown", output
    deadline = None if timeout is None else time.monotonic() + timeout
    with subprocess.Popen([str(BIN / "flwr"), "log", str(run_id), connection, "--stream"], cwd=ROOT, env=env,
                          text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as log:
        lines = []
        for line in log.stdout:  # live: the round lines appear as the rounds end
            lines.append(line)
            if echo:
                print(line, end="", flush=True)
            if deadline is not None and time.monotonic() > deadline:
                log.terminate()
                break
    output += "".join(lines)
    status = "unknown"
    for _ in range(60):  # the status settles shortly after the stream ends
        status = run_status(connection, str(run_id), env)
        if status.startswith("finished"):
            break
        time.sleep(1)
    return str(run_id), status, output


__all__ = ["BIN", "ROOT", "flwr", "json_of", "run_federation", "run_status"]
