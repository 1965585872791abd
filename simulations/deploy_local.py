"""A real deployment on this machine's loopback: `python -m simulations.deploy_local SITES... [-- OVERRIDES]`.

Each SITE is `name=domain` (a synthetic style or fundus domain of the configured data) or
`name=/path/to/images` (an unlabelled image folder). The command
  1. makes a CA, the SuperLink's TLS certificate and one key pair per SuperNode (server/certs.py),
     unless they exist in the deployment folder;
  2. starts a SuperLink with TLS and SuperNode authentication (`--insecure` only when asked), and
     registers every site's public key with `flwr supernode register`;
  3. starts one SuperNode per site, each with its own port, data and state folder (node config);
  4. runs the federation with `flwr run . <connection>` and reads the run's true status (`flwr ls`);
  5. stops every process it started, also on failure. Exit code 0 only for finished:completed.
Everything lives in the deployment folder (--dir, default runs/deploy): certs/, flwr/ (FLWR_HOME),
the SuperLink database, each site's state, and logs/.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from server.certs import make_all, make_node_keys
from server.config import load_config
from simulations.flwr_cli import BIN, ROOT, flwr, run_federation



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Deployment:
    def __init__(self, folder: Path, insecure: bool = False) -> None:
        self.dir, self.insecure = folder.resolve(), insecure
        self.certs, self.logs = self.dir / "certs", self.dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "FLWR_HOME": str(self.dir / "flwr"), "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("w")
        proc = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return flwr(*args, env=self.env, timeout=timeout)

    def start_superlink(self, nodes: int) -> None:
        tls = []
        if not self.insecure:
            if not (self.certs / "superlink.pem").is_file():
                make_all(self.certs, nodes=nodes)
            for i in range(nodes):  # a site added later gets its own key pair
                if not (self.certs / f"node{i}.pub").is_file():
                    make_node_keys(self.certs, i)
            tls = ["--ssl-ca-certfile", str(self.certs / "ca.pem"), "--ssl-certfile", str(self.certs / "superlink.pem"),
                   "--ssl-keyfile", str(self.certs / "superlink.key"), "--enable-supernode-auth"]
        for _ in range(3):  # a port taken between picking and binding costs a retry on another port
            proc = self._start("superlink", [str(BIN / "flower-superlink"), "--port", str(self.port), "--isolation",
                                             "subprocess", "--disable-runtime-dependency-installation",
                                             "--database", str(self.dir / "superlink.db"),
                                             *(["--insecure"] if self.insecure else tls)])
            if self.listening(proc):
                break
            self.port = free_port()
        else:
            raise RuntimeError(f"the SuperLink did not start; see {self.logs / 'superlink.log'}")
        conn = f'address = "127.0.0.1:{self.port}"\n' + ("insecure = true\n" if self.insecure else
                                                       f'root-certificates = "{self.certs / "ca.pem"}"\n')
        (self.dir / "flwr").mkdir(exist_ok=True)
        (self.dir / "flwr" / "config.toml").write_text(f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\n{conn}')

    def listening(self, proc: subprocess.Popen, timeout: float = 60) -> bool:
        """True once `proc` accepts connections on self.port; False if it exits first (e.g. the port was taken)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return proc.poll() is None
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"superlink did not come up within {timeout:.0f} s")

    def register(self, index: int) -> None:
        out = self.flwr("supernode", "register", str(self.certs / f"node{index}.pub"), "deploy")
        if out.returncode:
            raise RuntimeError(f"registering node{index} failed: {out.stdout[-500:]} {out.stderr[-500:]}")

    def start_supernode(self, index: int, node_config: dict[str, str], key: Path | None = None) -> subprocess.Popen:
        config = " ".join(f"{k}={json.dumps(str(v))}" for k, v in node_config.items())
        args = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}", "--port", str(free_port()),
                "--node-config", config, "--max-retries", "3", "--max-wait-time", "20"]
        if self.insecure:
            args.append("--insecure")
        else:
            args += ["--root-certificates", str(self.certs / "ca.pem"),
                     "--auth-supernode-private-key", str(key or self.certs / f"node{index}.key")]
        return self._start(f"supernode{index}", args)

    def run(self, overrides: list[str], timeout: float = 1800) -> str:
        """`flwr run` the federation; returns the run's final status."""
        run_id, status, output = run_federation("deploy", overrides, self.env, timeout)
        (self.logs / "flwr_run.log").write_text(output)
        if run_id is None:
            raise RuntimeError(f"flwr run reported no run id; see {self.logs / 'flwr_run.log'}")
        return status

    @staticmethod
    def wait_for(check, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if check():
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{what} did not come up within {timeout:.0f} s")

    def stop(self) -> None:
        """Every process this deployment started, and their children (ServerApp, ClientApps, SuperExec)."""
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    def __enter__(self) -> "Deployment":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def node_config(name: str, target: str, state: Path) -> dict[str, str]:
    folder = Path(target).expanduser()
    base = {"site": name, "state-dir": str(state / name)}
    if folder.is_dir():
        return {**base, "data-kind": "folder", "data-root": str(folder.resolve())}
    return {**base, "domain": target}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sites", nargs="+", help="name=domain or name=/image/folder")
    parser.add_argument("--dir", default="runs/deploy")
    parser.add_argument("--insecure", action="store_true", help="no TLS, no node authentication (testing only)")
    cut = argv.index("--") if "--" in argv else len(argv)  # sites and flags, then Hydra overrides
    args, overrides = parser.parse_args(argv[:cut]), list(argv[cut + 1:])
    sites = [s.split("=", 1) for s in args.sites]
    if any(len(s) != 2 for s in sites):
        parser.error("each site is name=domain or name=/image/folder")
    overrides.append(f"data.sites=[{','.join(n for n, _ in sites)}]")
    load_config(overrides)  # a bad override fails here, before any process starts
    with Deployment(Path(args.dir), args.insecure) as dep:
        dep.start_superlink(len(sites))
        for i, (name, target) in enumerate(sites):
            if not args.insecure:
                dep.register(i)
            dep.start_supernode(i, node_config(name, target, dep.dir / "sites"))
        status = dep.run(overrides)
    print(f"federation on the loopback deployment: {status} (logs in {dep.logs})")
    return 0 if status == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
