"""The coordinator's Flower ServerApp. Thin: configuration in, server/federation.py does the work.

Under `flwr run .` the run config (pyproject's [tool.flwr.app.config], or --run-config) carries flat
keys (federation, method, data, model, rounds, epsilon, sites, checkpoint, mlflow-uri, resume; see
server.config.RUN_CONFIG_KEYS), `overrides`, any other Hydra overrides as one string (power users),
and `base-dir`, the folder relative paths (data, checkpoints, mlflow.db, runs) are taken from.
"""
from __future__ import annotations

import os
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.config import FederateConfig, load_config, run_config_overrides
from server.federation import federate
from server.quiet import quiet

quiet()  # under `flwr run .` this module is the coordinator's first code: Flower's and MLflow's chatter goes


def make_server_app(cfg: FederateConfig, base: Path, run_dir: Path | None = None, results: list | None = None,
                    resume: bool = False) -> ServerApp:
    """A ServerApp bound to an already composed configuration (the Python simulation entry points)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        out = federate(grid, cfg, base, run_dir, resume)
        if results is not None:
            results.append(out)

    return app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = load_config(run_config_overrides(dict(context.run_config)))
    base = Path(str(context.run_config.get("base-dir", "")) or os.getcwd())
    run_dir = (Path(cfg.resume) if Path(cfg.resume).is_absolute() else base / cfg.resume) if cfg.resume else None
    federate(grid, cfg, base, run_dir, resume=bool(cfg.resume))
