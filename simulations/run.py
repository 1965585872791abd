"""One federation variant as a Flower simulation: `python -m simulations.run [overrides]`.

Defaults (conf/federate.yaml): synthetic domains, source `clean`, four other styles as the sites,
fedgrata at every site, variant local_only, MLflow in ./mlflow.db. The source model is trained on
first use and cached. `engine=inline` runs the sites one after another in this process instead of
Flower's simulation engine (for debugging).

Ctrl-C stops at once: the MLflow runs are marked KILLED and the command that continues the run is
printed. `resume=<run folder>` reads that run's saved configuration; overrides are optional and, if
given, must agree with it (a mismatch names the differing settings).
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_original_cwd
from omegaconf import OmegaConf

from client.client_app import app as client_app
from grata.train_source import ensure_source
from server.config import FederateConfig, resolved
from server.federation import federate
from server.inline_grid import InlineGrid
from server.server_app import make_server_app
from server.quiet import quiet
from server.tracking import flatten, kill_live

LAUNCH_KEYS = ("resume", "engine")  # how a run is launched, not what it computes


def interrupted(run_dir: Path | None = None) -> None:
    """After a Ctrl-C: mark the open MLflow runs KILLED and say how to continue."""
    live = kill_live()
    folders = [t.run_dir for t in live] or ([run_dir] if run_dir else [])
    print("\ninterrupted: MLflow runs marked KILLED" if live else "\ninterrupted", flush=True)
    for folder in folders:
        if (Path(folder) / "coordinator.pt").is_file():
            print(f"run folder: {folder}\ncontinue with: python -m simulations.run resume={folder}", flush=True)
        else:
            print(f"run folder: {folder} (no round finished yet: start it again)", flush=True)


def saved_config(run_dir: Path) -> dict:
    """The resolved configuration an interrupted run saved after its last finished round."""
    path = run_dir / "coordinator.pt"
    if not path.is_file():
        raise FileNotFoundError(f"resume: {path} does not exist (no finished round to resume from)")
    return torch.load(path, map_location="cpu", weights_only=False)["config"]


def resume_config(cfg: FederateConfig, overrides: list[str], base: Path) -> FederateConfig:
    """The saved configuration of the run in cfg.resume, with this launch's resume/engine. Overrides
    are optional; any the user gave must agree with the saved run (else: which settings differ)."""
    run_dir = Path(cfg.resume) if Path(cfg.resume).is_absolute() else base / cfg.resume
    saved, now = flatten(saved_config(run_dir)), flatten(resolved(cfg))
    given = [o.lstrip("+~").split("=", 1)[0] for o in overrides]
    touched = [k for k in given if k.split(".")[0] not in LAUNCH_KEYS]
    differ = sorted(k for k in saved.keys() | now.keys()
                    if any(k == t or k.startswith(t + ".") for t in touched) and saved.get(k) != now.get(k))
    if differ:
        lines = "; ".join(f"{k}: saved {saved.get(k, '<unset>')}, given {now.get(k, '<unset>')}" for k in differ)
        raise ValueError(f"resume={cfg.resume}: your overrides differ from the saved run: {lines}. "
                         "Drop them to continue the saved run as it was.")
    merged = OmegaConf.merge(OmegaConf.structured(FederateConfig),
                             {k: v for k, v in saved_config(run_dir).items() if k not in LAUNCH_KEYS})
    out: FederateConfig = OmegaConf.to_object(merged)
    out.resume, out.engine = cfg.resume, cfg.engine
    return out


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

    def stop_now(signum, frame) -> None:
        # The coordinator runs in Flower's server thread, which a KeyboardInterrupt in this (main) thread
        # would not stop: it would wait on its round for minutes. So: close the records, then leave.
        interrupted(run_dir)
        try:  # Ray's own processes (raylet, agents, workers): it knows their ids and stops exactly those
            import ray
            if ray.is_initialized():
                ray.shutdown()
        except Exception:  # noqa: BLE001 - leaving matters more than a clean engine
            pass
        os._exit(130)

    previous = signal.signal(signal.SIGINT, stop_now)
    try:
        run_simulation(server_app=make_server_app(cfg, base, run_dir, results, resume=bool(cfg.resume)),
                       client_app=client_app, num_supernodes=n,
                       backend_config={"client_resources": {"num_cpus": cfg.threads, "num_gpus": 0.0},
                                       "init_args": {"num_cpus": cpus, "num_gpus": 0, "logging_level": "ERROR",
                                                     "log_to_driver": True}})
    finally:
        signal.signal(signal.SIGINT, previous)
    if not results:
        raise RuntimeError("the simulation ended without a result; see the log above")
    return results[0]


def task_overrides() -> list[str]:
    """The overrides the user typed (Hydra's record of this launch)."""
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:  # not under @hydra.main
        return []


@hydra.main(version_base="1.3", config_path="../conf", config_name="federate")
def main(cfg) -> dict:
    typed: FederateConfig = OmegaConf.to_object(cfg)  # the dataclass checks run before any work
    quiet()
    base = Path(get_original_cwd())
    if typed.resume:
        typed = resume_config(typed, task_overrides(), base)
    if HydraConfig.get().mode == RunMode.MULTIRUN and not typed.mlflow.group:  # -m: the sweep is the comparison
        typed.mlflow.group = Path(HydraConfig.get().sweep.dir).name
    try:
        return simulate(typed, base)  # Hydra hands it to simulations.compare.CompareCallback in a multirun
    except KeyboardInterrupt:  # inline engine or source training: federate closed its runs as KILLED and said so
        kill_live()
        sys.exit(130)


if __name__ == "__main__":
    main()
