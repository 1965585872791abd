"""MLflow records of a federation, written from the coordinator only.

One parent run per variant (params: the whole resolved configuration; tag fedgrata.variant; metrics:
the means over sites), one nested child run per site (tag fedgrata.site) with its per-round metrics.
Metric writes go in one batch per run and round. Runs are addressed by id through MlflowClient: no
global active run, so several trackers can coexist in one process.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from server.config import MlflowConfig

BATCH_PARAMS = 100  # MLflow accepts at most 100 params per batch call


def tracking_uri(cfg: MlflowConfig, base: Path) -> str:
    """The configured URI, or a sqlite file in `base` addressed by its absolute path."""
    return cfg.tracking_uri or f"sqlite:///{(Path(base) / 'mlflow.db').resolve()}"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}; values as strings, cut to MLflow's 6000 characters."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = str(value)[:6000]
    return out


class Tracker:
    """If the tracking store cannot be reached, at the start or later, the federation goes on: one
    warning names the store and the error, and every record from then on goes to `journal` (JSON
    lines: params, metrics per run and round, tags, artifact paths) beside the run's own CSVs."""

    def __init__(self, cfg: MlflowConfig, base: Path, variant: str, config: dict[str, Any], sites: list[str],
                 journal: Path, runs: tuple[str, dict[str, str]] | None = None) -> None:
        """runs: (parent id, {site: child id}) of an interrupted federation to continue in."""
        # a dead server must cost seconds, not MLflow's default minutes of retries, per call
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.uri, self.journal, self.offline = tracking_uri(cfg, base), Path(journal), None
        self.client = MlflowClient(self.uri)
        self.parent, self.children = None, {}
        self.logged: dict[str, int] = {}  # resume: run id -> the last step already in the store
        if runs is not None:
            self.parent, self.children = runs[0], dict(runs[1])
            self._do({"kind": "resume", "parent": self.parent}, self._reopen)
            return
        record = {"kind": "start", "variant": variant, "sites": sites, "params": flatten(config)}
        self._do(record, lambda: self._open(cfg, variant, config, sites))

    def _open(self, cfg: MlflowConfig, variant: str, config: dict[str, Any], sites: list[str]) -> None:
        exp = self.client.get_experiment_by_name(cfg.experiment)
        if exp is None:
            location = None
            if self.uri.startswith("sqlite:///"):  # artifacts beside the database, not in the working directory
                location = (Path(self.uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
            exp_id = self.client.create_experiment(cfg.experiment, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        self.parent = self.client.create_run(exp_id, run_name=cfg.run_name or variant,
                                             tags={"fedgrata.variant": variant}).info.run_id
        params = [Param(k, v) for k, v in flatten(config).items()]
        for i in range(0, len(params), BATCH_PARAMS):
            self.client.log_batch(self.parent, params=params[i:i + BATCH_PARAMS])
        for site in sites:
            tags = {"mlflow.parentRunId": self.parent, "fedgrata.site": site, "fedgrata.variant": variant}
            self.children[site] = self.client.create_run(exp_id, run_name=f"{variant} / {site}", tags=tags).info.run_id

    def _reopen(self) -> None:
        """Back to RUNNING, and note each run's last logged step: a coordinator stopped between its MLflow
        write and its saved state redoes that round, and the round must not be logged twice."""
        for run_id in [self.parent, *self.children.values()]:
            if run_id:
                self.client.update_run(run_id, "RUNNING")
                keys = self.client.get_run(run_id).data.metrics
                self.logged[run_id] = max((m.step for k in keys for m in self.client.get_metric_history(run_id, k)),
                                          default=0)

    def _do(self, record: dict[str, Any], write) -> None:
        """Write to MLflow while it answers; otherwise (and from the first failure on) to the journal."""
        if self.offline is None:
            try:
                write()
                return
            except Exception as exc:  # noqa: BLE001 - any store failure: connection, HTTP, database
                self.offline = f"{type(exc).__name__}: {str(exc)[:300]}"
                warnings.warn(f"MLflow at {self.uri} is unreachable ({self.offline}); the federation goes on and "
                              f"keeps its records in {self.journal}", RuntimeWarning, stacklevel=2)
                print(f"WARNING: MLflow at {self.uri} is unreachable; records go to {self.journal}", flush=True)
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        with self.journal.open("a") as fh:
            fh.write(json.dumps({"time": time.time(), **record}) + "\n")

    def log_round(self, rnd: int, per_site: dict[str, dict[str, float]], means: dict[str, float]) -> None:
        stamp = int(time.time() * 1000)
        for site, metrics in per_site.items():
            if rnd <= self.logged.get(self.children.get(site), 0):
                continue
            values = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            batch = [Metric(k, v, stamp, rnd) for k, v in values.items()]
            self._do({"kind": "metrics", "site": site, "step": rnd, "metrics": values},
                     lambda: batch and self.client.log_batch(self.children[site], metrics=batch))
        if rnd <= self.logged.get(self.parent, 0):
            return
        self._do({"kind": "metrics", "site": None, "step": rnd, "metrics": means},
                 lambda: self.client.log_batch(self.parent, metrics=[Metric(k, float(v), stamp, rnd) for k, v in means.items()]))

    def tag_site(self, site: str, key: str, value: str) -> None:
        self._do({"kind": "tag", "site": site, "key": key, "value": value},
                 lambda: self.client.log_batch(self.children[site], tags=[RunTag(key, value)]))

    def log_artifact(self, path: Path, site: str | None = None, folder: str | None = None) -> None:
        self._do({"kind": "artifact", "site": site, "path": str(path), "folder": folder},
                 lambda: self.client.log_artifact(self.children[site] if site else self.parent, str(path), folder))

    def finish(self, status: str = "FINISHED") -> None:
        def close():
            for run_id in [*self.children.values(), self.parent]:
                self.client.set_terminated(run_id, status=status)
        self._do({"kind": "finish", "status": status}, close)


__all__ = ["Tracker", "flatten", "tracking_uri"]
