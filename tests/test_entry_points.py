"""Hydra entry points: bad values stop before any work; a tiny end-to-end evaluation writes its table."""
import csv
import json

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from hydra.errors import ConfigCompositionException

import simulations.evaluate as evaluate  # noqa: F401 - registers the schema
import grata.train_source  # noqa: F401
from pathlib import Path

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def compose_typed(name, overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return OmegaConf.to_object(compose(config_name=name, overrides=overrides))


@pytest.mark.parametrize("override,match", [
    ("data.size=100", "data.size"), ("data.kind=dicom", "data.kind"), ("model.encoder=vgg", "model.encoder"),
    ("data.on_error=ignore", "data.on_error"),
])
def test_bad_values_fail_at_composition(override, match):
    with pytest.raises(ValueError, match=match):
        compose_typed("evaluate", [override])


def test_wrong_types_fail_at_composition():
    with pytest.raises(ConfigCompositionException, match="train.epochs=many"):
        compose_typed("train_source", ["train.epochs=many"])


def test_fundus_preset_is_the_papers_protocol():
    cfg = compose_typed("evaluate", ["data=fundus"])
    assert cfg.model.encoder == "resnet34" and cfg.data.size == 256 and cfg.data.source == "RIM_ONE_r2"
    assert cfg.data.targets == ["RIM_ONE_r1", "RIM_ONE_r3", "Drishti_GS"] and cfg.data.target_split == "all"
    assert cfg.methods["grata_paper"].options["bn"] == "image" and cfg.methods["grata_paper"].options["lr"] == 1e-4


def test_tiny_evaluation_end_to_end(tmp_path):
    cfg = compose_typed("evaluate", [
        "data.size=64", "data.synthetic_train=16", "data.synthetic_test=3", "data.targets=[gamma,noise]",
        "train.epochs=1", f"checkpoint={tmp_path}/src.pt", f"out_dir={tmp_path}/out", "run=[source,grata_paper]",
    ])
    results = evaluate.run(cfg)
    assert (tmp_path / "src.json").is_file()  # trained on first use, with its in-domain summary
    assert set(results) == {"source", "grata_paper"}
    with (tmp_path / "out" / "per_image.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * 2 * 3
    for method in results:
        for target in ("gamma", "noise"):
            mine = [float(r["dice_mean"]) for r in rows if r["method"] == method and r["target"] == target]
            assert results[method][target]["dice_mean"] == pytest.approx(np.mean(mine), abs=1e-4)
    stored = json.loads((tmp_path / "out" / "results.json").read_text())
    assert stored["results"]["grata_paper"]["describe"]["bn"] == "image"
    assert "grata_paper" in (tmp_path / "out" / "table.txt").read_text()
    assert (tmp_path / "out" / "dice.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="unknown methods"):
        cfg.run = ["nonexistent"]
        evaluate.run(cfg)


def test_report_merges_runs_split_across_processes(tmp_path):
    from simulations.report import merge

    common = ["data.size=64", "data.synthetic_train=8", "data.synthetic_test=2", "data.targets=[gamma]",
              "train.epochs=1", f"checkpoint={tmp_path}/src.pt"]
    evaluate.run(compose_typed("evaluate", [*common, "run=[source]", f"out_dir={tmp_path}/a"]))
    evaluate.run(compose_typed("evaluate", [*common, "run=[bn]", f"out_dir={tmp_path}/b"]))
    merged = merge([tmp_path / "a", tmp_path / "b"], tmp_path / "all")
    assert list(merged) == ["source", "bn"]
    from simulations.report import markdown_table

    md = markdown_table(merged, ["gamma"]).splitlines()
    assert md[0] == "| method | gamma | mean |" and md[2].startswith("| source | ") and len(md) == 4
    with (tmp_path / "all" / "per_image.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 4
    with pytest.raises(ValueError, match="repeats methods"):
        merge([tmp_path / "a", tmp_path / "a"], tmp_path / "bad")


def test_federation_config_groups_and_bad_values():
    from hydra.errors import ConfigCompositionException

    from server.config import Variant, load_config

    cfg = load_config(["federation=fed_stats", "method=grata_paper", "privacy=strict", "data=fundus", "model=resnet18"])
    assert cfg.federation.variant == Variant.fed_stats and cfg.privacy.epsilon == 1.0
    assert cfg.method.adapter == "grata" and cfg.method.options["bn"] == "image"
    assert cfg.data.sites == ["Drishti_GS", "RIM_ONE_r1", "RIM_ONE_r2", "RIM_ONE_r3"] and cfg.data.site_split == "test"
    assert cfg.model.encoder == "resnet18"  # the model group, when chosen, wins over the data default
    assert load_config(["data=fundus"]).model.encoder == "resnet34"
    with pytest.raises(ConfigCompositionException):
        load_config(["federation.variant=everything"])  # not a variant: Hydra's error
    with pytest.raises(ConfigCompositionException):
        load_config(["federation.rounds=many"])
    for bad, name in (("privacy.epsilon=0", "epsilon"), ("federation.pooled_weight=2", "pooled_weight"),
                      ("engine=spark", "engine"), ("data.site_split=val", "site_split"), ("variants=[fed_all]", "variants")):
        with pytest.raises(ValueError, match=name):
            load_config([bad])
