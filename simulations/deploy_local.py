"""A real deployment on this machine's loopback: `python -m simulations.deploy_local SITES... [-- OVERRIDES]`.

Each SITE is `name=domain` (a synthetic style or fundus domain of the configured data) or
`name=/path/to/images` (an unlabelled image folder). The command
  1. makes a CA and the SuperLink's TLS certificate (server/certs.py), and in each site's own folder
     its key pair (as the site would on its host); only the public keys are copied out;
  2. starts a SuperLink with TLS and SuperNode authentication (`--insecure` only when asked), bound to
     127.0.0.1 (its Control API shares the port and has no authentication of its own: docs/privacy.md),
     and registers every site's public key with `flwr supernode register`;
  3. starts one SuperNode per site, each with its own port, data and state folder, and its own privacy
     limits in its node config (max-epsilon, max-delta, min-noise-multiplier, min-images, a ledger
     folder outside the run, and the pinned source digest; client/limits.py);
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

from client.site import load_source
from grata.train_source import ensure_source
from server.certs import make_all, make_site_key
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
        self.node_ports: dict[int, int] = {}  # SuperNode index -> the port its Runtime API listens on
        self.env = {**os.environ, "FLWR_HOME": str(self.dir / "flwr"), "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("w")
        proc = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return flwr(*args, env=self.env, timeout=timeout)

    def site_key(self, index: int) -> tuple[Path, Path]:
        """Site `index`'s key pair, made in its own folder (standing in for its host); (key, public key)."""
        folder = self.dir / "site-keys" / f"node{index}"
        if not (folder / f"node{index}.pub").is_file():
            make_site_key(folder, f"node{index}")
        return folder / f"node{index}.key", folder / f"node{index}.pub"

    def start_superlink(self, nodes: int) -> None:
        tls = []
        if not self.insecure:
            if not (self.certs / "superlink.pem").is_file():
                make_all(self.certs)
            tls = ["--ssl-ca-certfile", str(self.certs / "ca.pem"), "--ssl-certfile", str(self.certs / "superlink.pem"),
                   "--ssl-keyfile", str(self.certs / "superlink.key"), "--enable-supernode-auth"]
        for _ in range(3):  # a port taken between picking and binding costs a retry on another port
            proc = self._start("superlink", [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port",
                                             str(self.port), "--isolation", "subprocess", "--disable-runtime-dependency-installation",
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

    def listening(self, proc: subprocess.Popen, port: int | None = None, timeout: float = 60) -> bool:
        """True once `proc` accepts connections on `port` (default: the SuperLink's); False if it exits
        first (e.g. the port was taken between picking and binding)."""
        port = port or self.port
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return proc.poll() is None
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"{Path(str(proc.args[0])).name} did not listen on port {port} within {timeout:.0f} s")

    def register(self, index: int) -> None:
        out = self.flwr("supernode", "register", str(self.site_key(index)[1]), "deploy")
        if out.returncode:
            raise RuntimeError(f"registering node{index} failed: {out.stdout[-500:]} {out.stderr[-500:]}")

    def start_supernode(self, index: int, node_config: dict[str, str], key: Path | None = None,
                        attempts: int = 3) -> subprocess.Popen:
        """SuperNode `index`, listening for its ClientApps (its Runtime API, on loopback) on a port of its own.

        The port is picked free and then handed to the SuperNode, which binds it a few seconds later: one
        taken in between makes it exit at start-up, and costs a retry on another port, as for the SuperLink."""
        config = " ".join(f"{k}={json.dumps(str(v))}" for k, v in node_config.items())
        tls = ["--insecure"] if self.insecure else [
            "--root-certificates", str(self.certs / "ca.pem"), "--auth-supernode-private-key", str(key or self.site_key(index)[0])]
        for _ in range(attempts):
            port = free_port()
            proc = self._start(f"supernode{index}", [
                str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}", "--host", "127.0.0.1",
                "--port", str(port), "--node-config", config, "--max-retries", "3", "--max-wait-time", "20", *tls])
            log = self.logs / f"supernode{index}.log"
            if self.listening(proc, port) or "address already in use" not in log.read_text().lower():
                self.node_ports[index] = port  # up, or ended for a reason of its own (e.g. a key the SuperLink refused)
                return proc
        raise RuntimeError(f"SuperNode {index} found its port taken {attempts} times; see {self.logs / f'supernode{index}.log'}")

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


# The limits every loopback site sets for itself (a real site picks its own): the run's default budget
LIMITS = {"max-epsilon": 8.0, "max-delta": 1e-5, "min-noise-multiplier": 0.5, "min-images": 2}


def node_config(name: str, target: str, state: Path, digest: str, limits: dict | None = None) -> dict[str, str]:
    """A site's node config: its data, its state folder, its ledger folder (beside, not inside, the
    state folder) and its own privacy limits with the pinned source digest."""
    folder = Path(target).expanduser()
    base = {"site": name, "state-dir": str(state / name), "ledger-dir": str(state.parent / "ledgers" / name),
            "source-digest": digest, **{k: str(v) for k, v in (limits or LIMITS).items()}}
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
    cfg = load_config(overrides)  # a bad override fails here, before any process starts
    with Deployment(Path(args.dir), args.insecure) as dep:
        dep.start_superlink(len(sites))
        digest = load_source(ensure_source(cfg, ROOT))[2]  # the source model every site pins
        for i, (name, target) in enumerate(sites):
            if not args.insecure:
                dep.register(i)
            dep.start_supernode(i, node_config(name, target, dep.dir / "sites", digest))
        status = dep.run(overrides)
    print(f"federation on the loopback deployment: {status} (logs in {dep.logs})")
    return 0 if status == "finished:completed" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
