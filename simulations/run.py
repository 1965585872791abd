"""One federation variant as a Flower simulation: `python -m simulations.run [overrides]`.

Defaults (conf/federate.yaml): synthetic domains, source `clean`, four other styles as the sites,
fedgrata at every site, variant local_only, MLflow in ./mlflow.db. The source model is trained on
first use and cached. `engine=inline` runs the sites one after another in this process instead of
Flower's simulation engine (for debugging).
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import hydra
from hydra.utils import get_original_cwd
from omegaconf import OmegaConf

from client.client_app import app as client_app
from grata.train_source import ensure_source
from server.config import FederateConfig
from server.federation import federate
from server.inline_grid import InlineGrid
from server.server_app import make_server_app


def quiet() -> None:
    """Keep the console to progress and tables: Flower's per-message debug lines and library warnings go."""
    logging.getLogger("flwr").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", module="mlflow")
    warnings.filterwarnings("ignore", message=".*noload.*")


def simulate(cfg: FederateConfig, base: Path, run_dir: Path | None = None) -> dict:
    """Run cfg.federation.variant across len(cfg.data.sites) simulated sites; returns federate's result."""
    if cfg.resume:
        run_dir = Path(cfg.resume) if Path(cfg.resume).is_absolute() else base / cfg.resume
    ensure_source(cfg, base)
    n = len(cfg.data.sites)
    if cfg.engine == "inline":
        grid = InlineGrid(client_app, [{"partition-id": i, "num-partitions": n} for i in range(n)])
        return federate(grid, cfg, base, run_dir, resume=bool(cfg.resume))
    from flwr.simulation import run_simulation  # the engine (Ray) only when it is used

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    results: list[dict] = []
    cpus = max(1, min(n * cfg.threads, os.cpu_count() or 1))
    run_simulation(server_app=make_server_app(cfg, base, run_dir, results, resume=bool(cfg.resume)), client_app=client_app, num_supernodes=n,
                   backend_config={"client_resources": {"num_cpus": cfg.threads, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": cpus, "num_gpus": 0, "logging_level": "ERROR",
                                                 "log_to_driver": True}})
    if not results:
        raise RuntimeError("the simulation ended without a result; see the log above")
    return results[0]


@hydra.main(version_base="1.3", config_path="../conf", config_name="federate")
def main(cfg) -> None:
    typed: FederateConfig = OmegaConf.to_object(cfg)  # the dataclass checks run before any work
    quiet()
    simulate(typed, Path(get_original_cwd()))


if __name__ == "__main__":
    main()
