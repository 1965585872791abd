"""Keep a run's console to what a user can act on: progress, per-round lines, tables, real warnings.

Used by every entry point and by the ServerApp module (under `flwr run .` the coordinator runs in
Flower's own process, where no entry point of ours ran first).
"""
from __future__ import annotations

import logging
import os
import warnings


class _DropDeprecation(logging.Filter):
    """Flower 1.41 deprecates run_simulation; this project keeps it on purpose (README: Flower's launcher)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "DEPRECATED FEATURE" not in str(record.msg)


def quiet() -> None:
    """Keep the console to progress and tables: nothing a user cannot act on.

    Flower's debug lines and its run_simulation deprecation notice, MLflow's INFO lines (store
    migrations, run links) and library deprecation warnings (SQLAlchemy's inside MLflow) go."""
    flwr = logging.getLogger("flwr")
    flwr.setLevel(logging.WARNING)
    if not any(isinstance(f, _DropDeprecation) for f in flwr.filters):
        flwr.addFilter(_DropDeprecation())
    for name in ("mlflow", "alembic", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray").setLevel(logging.ERROR)  # its thread and accelerator notices are about Ray, not the run
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", module="mlflow")
    warnings.filterwarnings("ignore", message=".*noload.*")


__all__ = ["quiet"]
