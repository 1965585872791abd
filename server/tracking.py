"""MLflow records of a federation, written from the coordinator only.

Layout (what a user sees in the MLflow UI):
  experiment <name>          (tag mlflow.experimentKind = custom_model_development)
    one run per variant      "<variant> <group>", tags fedgrata.variant and fedgrata.compare = <group>;
                             params: the whole resolved configuration; metrics: the figures the
                             console reports (stream-level dice_mean, dice_disc, dice_cup, dice_proxy,
                             and per site "<site>/dice_mean" ...), the per-round series as
                             "round/<metric>" (step = round); inputs: every site's dataset
    one `source` run         per comparison: the unadapted model on the same sites (simulations.compare)
  experiment <name>-sites    one run per site and variant (tags fedgrata.site, mlflow.parentRunId),
                             params, dataset input, the same metric scheme for that site alone.
The site runs live in their own experiment so that the comparison's chart view, which shows the
first 10 runs by default, shows every variant of several comparisons instead of a few site runs.
Every run carries the code version (mlflow.source.git.commit) and the command (mlflow.source.name).
Metric writes go in one batch per run and round. Runs are addressed by id through MlflowClient: no
global active run, so several trackers can coexist in one process.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from server.config import MlflowConfig

BATCH_PARAMS = 100  # MLflow accepts at most 100 params per batch call
KIND = {"mlflow.experimentKind": "custom_model_development"}  # else MLflow 3 opens its GenAI traces page
ROOT = Path(__file__).resolve().parent.parent
STREAM_KEYS = ("dice_mean", "dice_disc", "dice_cup", "dice_proxy", "align_cos_mean", "lr_mean", "dp_epsilon",
               "images", "skipped", "flagged", "resets", "failures")
SITE_PARAMS = ("data.kind", "data.size", "data.site_split", "data.on_error", "model.encoder", "method.adapter",
               "federation.variant", "federation.rounds", "seed")

LIVE: list["Tracker"] = []  # open trackers: a Ctrl-C marks their runs KILLED (simulations.run)
_LIVE_LOCK = threading.Lock()


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


def command_line() -> str:
    """How this process was started, as a user would type it (`python -m pkg.mod args`)."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
    try:
        module = argv0.resolve().relative_to(ROOT).with_suffix("")
        head = ["python", "-m", ".".join(module.parts)]
    except ValueError:
        head = [argv0.name]
    return shlex.join([*head, *sys.argv[1:]])


def code_tags() -> dict[str, str]:
    """The code version and command as MLflow's own source tags (shown in the run's overview)."""
    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": command_line()[:5000],
            "fedgrata.command": command_line()[:5000]}
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True,  # noqa: E731
                                        timeout=10, check=True).stdout.strip()
        tags["mlflow.source.git.commit"] = git("rev-parse", "HEAD")
        tags["fedgrata.git.dirty"] = str(bool(git("status", "--porcelain", "--untracked-files=no")))
    except (OSError, subprocess.SubprocessError):
        pass  # not a git checkout (an installed copy): the command still says what ran
    return tags


def dataset_input(name: str, info: dict[str, Any]) -> DatasetInput:
    """A site's image stream as an MLflow dataset: where it comes from, how many images, labelled or not."""
    source = str(info.get("source", name))
    digest = hashlib.sha256(json.dumps(info, sort_keys=True, default=str).encode()).hexdigest()[:12]
    profile = json.dumps({k: info[k] for k in ("images", "labelled", "split", "size") if k in info})
    return DatasetInput(Dataset(name=name, digest=digest, source_type=str(info.get("kind", "local")), source=source,
                                profile=profile), tags=[InputTag("mlflow.data.context", "site stream")])


def stream_metrics(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(row[k]) for k in STREAM_KEYS if isinstance(row.get(k), (int, float))}


class Tracker:
    """If the tracking store cannot be reached, at the start or later, the federation goes on: one
    warning names the store and the error, and every record from then on goes to `journal` (JSON
    lines: params, metrics per run and round, tags, artifact paths) beside the run's own CSVs."""

    def __init__(self, cfg: MlflowConfig, base: Path, variant: str, config: dict[str, Any], sites: list[str],
                 journal: Path, runs: tuple[str, dict[str, str]] | None = None, group: str = "",
                 datasets: dict[str, dict[str, Any]] | None = None) -> None:
        """runs: (parent id, {site: child id}) of an interrupted federation to continue in.
        group: the comparison these runs belong to (tag fedgrata.compare, part of every run name).
        datasets: per site, what its stream is (kind, source, images, labelled) for the dataset inputs."""
        # a dead server must cost seconds, not MLflow's default minutes of retries, per call
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        # MLflow's sqlite store trips SQLAlchemy's `noload` deprecation on first use; nothing a user can
        # act on. Added here, at first use, because Ray and Flower reset warning filters after start-up.
        warnings.filterwarnings("ignore", message=".*noload.*")
        self.uri, self.journal, self.offline = tracking_uri(cfg, base), Path(journal), None
        self.run_dir = self.journal.parent
        self.client = MlflowClient(self.uri)
        self.parent, self.children, self.closed = None, {}, False
        self.logged: dict[str, int] = {}  # resume: run id -> the last step already in the store
        self.cfg, self.variant, self.group, self.flat = cfg, variant, group, flatten(config)  # for sites that join later
        with _LIVE_LOCK:
            LIVE.append(self)
        if runs is not None:
            self.parent, self.children = runs[0], dict(runs[1])
            self._do({"kind": "resume", "parent": self.parent}, self._reopen)
            return
        record = {"kind": "start", "variant": variant, "sites": sites, "params": flatten(config), "group": group}
        self._do(record, lambda: self._open(cfg, variant, config, sites, group, datasets or {}))

    def _experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.tags.get("mlflow.experimentKind") is None:  # made by an older version: say what it holds
                self.client.set_experiment_tag(exp.experiment_id, *next(iter(KIND.items())))
            return exp.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):  # artifacts beside the database, not in the working directory
            location = (Path(self.uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
        return self.client.create_experiment(name, artifact_location=location, tags=KIND)

    def _open(self, cfg: MlflowConfig, variant: str, config: dict[str, Any], sites: list[str], group: str,
              datasets: dict[str, dict[str, Any]]) -> None:
        exp_id = self._experiment(cfg.experiment)
        common = {**code_tags(), "fedgrata.variant": variant, **({"fedgrata.compare": group} if group else {})}
        name = cfg.run_name or (f"{variant} {group}" if group else variant)
        self.parent = self.client.create_run(exp_id, run_name=name, tags=common).info.run_id
        flat = flatten(config)
        params = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(params), BATCH_PARAMS):
            self.client.log_batch(self.parent, params=params[i:i + BATCH_PARAMS])
        if datasets:
            self.client.log_inputs(self.parent, [dataset_input(s, datasets[s]) for s in sites if s in datasets])
        for site in sites:
            self._child(site, datasets.get(site))

    def _child(self, site: str, dataset: dict[str, Any] | None) -> None:
        """The site's own run under the parent, in the sites' experiment."""
        cfg, group = self.cfg, self.group
        common = {**code_tags(), "fedgrata.variant": self.variant, **({"fedgrata.compare": group} if group else {})}
        name = cfg.run_name or (f"{self.variant} {group}" if group else self.variant)
        tags = {**common, "mlflow.parentRunId": self.parent, "fedgrata.site": site}
        sites_exp = self._experiment(f"{cfg.experiment}-sites")
        child = self.client.create_run(sites_exp, run_name=f"{site} / {name}", tags=tags).info.run_id
        self.children[site] = child
        self.client.log_batch(child, params=[Param("site", site), *[Param(k, self.flat[k]) for k in SITE_PARAMS if k in self.flat]])
        if dataset:
            self.client.log_inputs(child, [dataset_input(site, dataset)])

    def add_site(self, site: str, dataset: dict[str, Any] | None = None) -> None:
        """A site that joined the running federation: its run, once (a resumed run keeps its own)."""
        if site not in self.children:
            self._do({"kind": "site", "site": site}, lambda: self._child(site, dataset))

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
        """The per-round series, as round/<metric> at step = round (the stream-level figures come at the end)."""
        stamp = int(time.time() * 1000)
        for site, metrics in per_site.items():
            if rnd <= self.logged.get(self.children.get(site), 0):  # already in the store before a resume
                continue
            values = {f"round/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            batch = [Metric(k, v, stamp, rnd) for k, v in values.items()]
            self._do({"kind": "metrics", "site": site, "step": rnd, "metrics": values},
                     lambda: batch and self.client.log_batch(self.children[site], metrics=batch))
        if rnd <= self.logged.get(self.parent, 0):
            return
        values = {f"round/{k}": float(v) for k, v in means.items()}
        self._do({"kind": "metrics", "site": None, "step": rnd, "metrics": values},
                 lambda: self.client.log_batch(self.parent, metrics=[Metric(k, v, stamp, rnd) for k, v in values.items()]))

    def log_summary(self, summary: dict[str, dict[str, Any]], mean: dict[str, Any], step: int = 0) -> None:
        """The figures the console's tables report: per site over its whole stream, and their mean.
        One value each, at step 0 like the source run's: the UI's chart view draws them as bars."""
        stamp = int(time.time() * 1000)
        for site, row in summary.items():
            values = stream_metrics(row)
            if values and (site in self.children or self.offline is not None):  # offline: into the journal
                self._do({"kind": "metrics", "site": site, "step": step, "metrics": values},
                         lambda: self.client.log_batch(self.children[site], metrics=[Metric(k, v, stamp, step) for k, v in values.items()]))
        values = stream_metrics(mean)
        for site, row in summary.items():  # per site on the parent too: one chart per site across variants
            values.update({f"{site}/{k}": v for k, v in stream_metrics(row).items() if k.startswith("dice")})
        self._do({"kind": "metrics", "site": None, "step": step, "metrics": values},
                 lambda: self.client.log_batch(self.parent, metrics=[Metric(k, v, stamp, step) for k, v in values.items()]))

    def tag_site(self, site: str, key: str, value: str) -> None:
        self._do({"kind": "tag", "site": site, "key": key, "value": value},
                 lambda: self.client.log_batch(self.children[site], tags=[RunTag(key, value)]))

    def log_artifact(self, path: Path, site: str | None = None, folder: str | None = None) -> None:
        self._do({"kind": "artifact", "site": site, "path": str(path), "folder": folder},
                 lambda: self.client.log_artifact(self.children[site] if site else self.parent, str(path), folder))

    def finish(self, status: str = "FINISHED") -> None:
        """Close every run with `status` (FINISHED, FAILED, KILLED); once: a Ctrl-C may have closed them."""
        if self.closed:
            return
        self.closed = True
        with _LIVE_LOCK:
            if self in LIVE:
                LIVE.remove(self)

        def close():
            for run_id in [*self.children.values(), self.parent]:
                if run_id:
                    self.client.set_terminated(run_id, status=status)
        self._do({"kind": "finish", "status": status}, close)


def log_source_run(cfg: MlflowConfig, base: Path, group: str, summary: dict[str, dict[str, Any]],
                   mean: dict[str, Any], config: dict[str, Any], datasets: dict[str, dict[str, Any]] | None = None) -> str | None:
    """The comparison's baseline: the unadapted source model on the same sites, as one finished run
    named `source <group>` with the variants' metric names. Returns its id (None if MLflow is down)."""
    warnings.filterwarnings("ignore", message=".*noload.*")  # see Tracker.__init__
    client = MlflowClient(tracking_uri(cfg, base))
    try:
        exp = client.get_experiment_by_name(cfg.experiment)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(cfg.experiment, tags=KIND)
        tags = {**code_tags(), "fedgrata.variant": "source", **({"fedgrata.compare": group} if group else {})}
        run = client.create_run(exp_id, run_name=f"source {group}".strip(), tags=tags).info.run_id
        params = [Param(k, v) for k, v in flatten(config).items()]
        for i in range(0, len(params), BATCH_PARAMS):
            client.log_batch(run, params=params[i:i + BATCH_PARAMS])
        if datasets:
            client.log_inputs(run, [dataset_input(s, d) for s, d in datasets.items()])
        values = stream_metrics(mean)
        for site, row in summary.items():
            values.update({f"{site}/{k}": v for k, v in stream_metrics(row).items() if k.startswith("dice")})
        stamp = int(time.time() * 1000)
        client.log_batch(run, metrics=[Metric(k, v, stamp, 0) for k, v in values.items()])
        client.set_terminated(run, "FINISHED")
        return run
    except Exception as exc:  # noqa: BLE001 - the baseline is a record, not the work: never stop for it
        print(f"WARNING: could not record the source run in MLflow ({type(exc).__name__}: {str(exc)[:200]})", flush=True)
        return None


def kill_live(reason: str = "interrupted") -> list["Tracker"]:
    """Mark every open tracker's runs KILLED (a Ctrl-C); returns them (their run folders say what to resume)."""
    with _LIVE_LOCK:
        live = list(LIVE)
    for tracker in live:
        tracker.finish("KILLED")
    return live


__all__ = ["KIND", "LIVE", "Tracker", "code_tags", "command_line", "dataset_input", "flatten", "kill_live",
           "log_source_run", "tracking_uri"]
