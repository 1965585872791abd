"""Screenshots of the MLflow UI in a real browser: `python scripts/mlflow_ui_screenshots.py [--store mlflow.db]`.

Starts `mlflow server` on 127.0.0.1 (a free port) over the given sqlite store, finds the latest
comparison (tag fedgrata.compare) in the `fedgrata` experiment, and has headless Chromium (Debian
package `chromium`) take PNGs of: the runs table, the chart view (every variant and the source
baseline visible by default), and one parent run's page. The server is stopped by its process group
at the end. Writes <out>/mlflow_*.png (default docs/img).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def shoot(browser: str, url: str, path: Path, size: str = "1900,1100", budget_ms: int = 60000) -> None:
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size}",
                        f"--virtual-time-budget={budget_ms}", f"--screenshot={path}", url],
                       check=True, capture_output=True, timeout=180)
    print(f"{path}  <- {url}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="mlflow.db", help="the sqlite file make demo wrote")
    parser.add_argument("--out", default="docs/img")
    parser.add_argument("--experiment", default="fedgrata")
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("needs Chromium: apt-get install -y chromium", file=sys.stderr)
        return 2
    store = Path(args.store).resolve()
    if not store.is_file():
        print(f"no MLflow store at {store}; run make demo first", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
                               f"sqlite:///{store}", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_http(f"{base}/health")
        client = MlflowClient(base)
        exp = client.get_experiment_by_name(args.experiment)
        runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
        group = next(r.data.tags["fedgrata.compare"] for r in runs if "fedgrata.compare" in r.data.tags)
        members = [r for r in runs if r.data.tags.get("fedgrata.compare") == group]
        print(f"comparison {group}: {', '.join(r.info.run_name for r in members)}")
        query = urllib.parse.quote(f"tags.`fedgrata.compare` = '{group}'")
        exp_url = f"{base}/#/experiments/{exp.experiment_id}"
        shoot(browser, f"{exp_url}/runs?searchFilter={query}", out / "mlflow_runs.png")
        shoot(browser, f"{exp_url}/runs?searchFilter={query}&compareRunsMode=CHART", out / "mlflow_charts.png",
              size="1600,1400")
        parent = next(r for r in members if r.data.tags.get("fedgrata.variant") != "source")
        shoot(browser, f"{exp_url}/runs/{parent.info.run_id}", out / "mlflow_run.png", size="1600,1200")
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its workers: ours only
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
