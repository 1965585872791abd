"""`flwr run .` on this machine, with its true status: `python -m simulations.flwr_local [hydra overrides]`.

Flower's own launcher, the supported path for Flower users. This wrapper
  - starts its own SuperLink in simulation mode (our process, on free ports, Flower's home in .flwr/
    of this checkout), so it never reuses or stops a SuperLink of another user of this host;
  - declares the local federation with `--federation-config`: one SuperNode per configured site
    (len(data.sites)), 1 CPU each;
  - passes the overrides and this directory as the run config;
  - shows the run's log live (`flwr log --stream`) and reads its final status from `flwr ls --format
    json`; exits non-zero unless it is finished:completed;
  - stops exactly the processes it started, by their process group.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from server.config import load_config
from simulations.flwr_cli import BIN, ROOT, run_federation


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def federation_config(sites: int) -> str:
    """Flower 1.41's way to size a local simulation (`flwr run --federation-config`)."""
    return (f"num-supernodes={sites} client-resources-num-cpus=1 client-resources-num-gpus=0 "
            f"init-args-num-cpus={min(sites, os.cpu_count() or 1)} init-args-logging-level='ERROR'")


class LocalSuperLink:
    """A simulation-mode SuperLink this process starts and stops (by its process group, never by name)."""

    def __init__(self, home: Path) -> None:
        self.home, self.port = home, free_port()
        self.env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "LocalSuperLink":
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "fedgrata-local"\n\n[superlink.fedgrata-local]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        log = (self.home / "superlink.log").open("w")
        self.proc = subprocess.Popen(
            [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
             "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(self.port),
             "--control-api-address", f"127.0.0.1:{free_port()}", "--fleet-api-address", f"127.0.0.1:{free_port()}",
            ],  # no --database: the state lives in memory and goes with the process
            env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"flower-superlink exited with {self.proc.returncode}; see {self.home / 'superlink.log'}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"flower-superlink did not listen on 127.0.0.1:{self.port} within 60 s")

    def __exit__(self, *exc) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # the SuperLink and what it started (ServerApp, simulation)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)


def main(overrides: list[str]) -> int:
    cfg = load_config(overrides)  # a bad override fails here, before anything starts
    with LocalSuperLink(ROOT / ".flwr") as link:
        run_id, status, _ = run_federation("fedgrata-local", overrides, link.env,
                                           federation_config=federation_config(len(cfg.data.sites)), echo=True)
    if run_id is None:
        print("flwr run did not start a run; see .flwr/superlink.log", file=sys.stderr)
        return 2
    print(f"run {run_id}: {status}")
    return 0 if status == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
