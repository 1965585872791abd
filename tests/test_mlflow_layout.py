"""MLflow as its users read it: runs read back from a local sqlite store after a tiny federation."""
from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from server.report import mean_row
from server.tracking import log_source_run
from tests.conftest import run_tiny, tiny_config


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, checkpoint):
    tmp = tmp_path_factory.mktemp("mlflow")
    result, _ = run_tiny(tmp, checkpoint, "mlflow.group=compare-test", "federation.rounds=2")
    return tmp, result, MlflowClient(f"sqlite:///{tmp}/mlflow.db")


def test_the_experiment_is_a_model_training_experiment_with_one_run_per_variant(recorded):
    _, _, client = recorded
    exp = client.get_experiment_by_name("fedgrata")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # not MLflow 3's GenAI page
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1  # the site runs are elsewhere: the chart view's first 10 runs are all variants
    run = runs[0]
    assert run.info.run_name == "local_only compare-test" and run.data.tags["fedgrata.compare"] == "compare-test"
    sites = client.search_runs([client.get_experiment_by_name("fedgrata-sites").experiment_id])
    assert {r.data.tags["fedgrata.site"] for r in sites} == {"colour_cast", "gamma"}
    assert all(r.data.tags["mlflow.parentRunId"] == run.info.run_id for r in sites)


def test_parent_metrics_are_the_stream_figures_the_console_reports(recorded):
    _, result, client = recorded
    run = client.search_runs([client.get_experiment_by_name("fedgrata").experiment_id])[0]
    mean = mean_row(result["sites"])  # what the per-site table's mean row and compare's table print
    assert run.data.metrics["dice_mean"] == pytest.approx(mean["dice_mean"], abs=1e-6)
    assert run.data.metrics["gamma/dice_mean"] == pytest.approx(result["sites"]["gamma"]["dice_mean"], abs=1e-6)
    history = client.get_metric_history(run.info.run_id, "round/dice_mean")
    assert [m.step for m in history] == [1, 2]
    last_round = history[-1].value
    assert run.data.metrics["round/dice_mean"] == last_round  # the last round is its own series, not dice_mean


def test_site_runs_carry_params_datasets_and_the_code_version(recorded):
    _, result, client = recorded
    sites = client.search_runs([client.get_experiment_by_name("fedgrata-sites").experiment_id])
    gamma = next(r for r in sites if r.data.tags["fedgrata.site"] == "gamma")
    assert gamma.data.params["site"] == "gamma" and gamma.data.params["method.adapter"] == "grata"
    assert gamma.data.params["federation.variant"] == "local_only"
    assert gamma.data.metrics["dice_mean"] == pytest.approx(result["sites"]["gamma"]["dice_mean"], abs=1e-6)
    inputs = gamma.inputs.dataset_inputs
    assert [i.dataset.name for i in inputs] == ["gamma"] and '"images": 4' in inputs[0].dataset.profile
    assert len(gamma.data.tags["mlflow.source.git.commit"]) == 40
    assert "pytest" in gamma.data.tags["mlflow.source.name"]  # the command that ran
    parent = client.get_run(gamma.data.tags["mlflow.parentRunId"])
    assert {i.dataset.name for i in parent.inputs.dataset_inputs} == {"colour_cast", "gamma"}


def test_two_invocations_get_distinct_names_and_a_source_baseline(tmp_path, checkpoint):
    for _ in range(2):
        run_tiny(tmp_path, checkpoint, "federation.rounds=1")
    cfg = tiny_config(tmp_path, checkpoint)
    summary = {"gamma": {"dice_mean": 40.0, "dice_disc": 50.0, "dice_cup": 30.0, "images": 4}}
    assert log_source_run(cfg.mlflow, tmp_path, "compare-x", summary, mean_row(summary), {"seed": 0})
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("fedgrata").experiment_id])
    names = [r.info.run_name for r in runs]
    assert len(names) == 3 and len(set(names)) == 3
    source = next(r for r in runs if r.data.tags["fedgrata.variant"] == "source")
    assert source.info.run_name == "source compare-x" and source.data.metrics["dice_mean"] == 40.0
    assert source.data.metrics["gamma/dice_cup"] == 30.0 and source.info.status == "FINISHED"
