"""`make demo`'s preset (conf/data/demo.yaml): its own checkpoint name, kept and reused once trained."""
from __future__ import annotations

import shutil

import pytest

import grata.train_source as train_source
from grata.train_source import default_checkpoint, ensure_source
from server.config import load_config


def test_the_demo_model_has_its_own_checkpoint_name():
    """The demo's smaller model must not be mistaken for the 128 px synthetic model trained before it
    (a checkpoint of that name sits in older clones), nor for the fundus model."""
    demo, synthetic, fundus = (load_config(o) for o in ([], ["data=synthetic"], ["data=fundus"]))
    names = {default_checkpoint(c) for c in (demo, synthetic, fundus)}
    assert len(names) == 3
    assert default_checkpoint(synthetic) == "checkpoints/source_synthetic_clean_resnet18_128.pt"  # the older demo's
    assert demo.data.kind == "synthetic" and demo.data.size < synthetic.data.size
    assert demo.train.threads == 1  # not torch's every-core default, which crawls beside any other job


def test_a_finished_demo_checkpoint_is_reused_not_retrained(tmp_path, checkpoint, monkeypatch, capsys):
    """A second `make demo` (checkpoint, its summary and its quality model in place) trains nothing."""
    cfg = load_config([])
    target = tmp_path / default_checkpoint(cfg)
    target.parent.mkdir(parents=True)
    shutil.copy(checkpoint, target)
    target.with_suffix(".json").write_text("{}")

    def no_training(*args, **kwargs):
        raise AssertionError("trained again although a finished checkpoint exists")

    monkeypatch.setattr(train_source, "train", no_training)
    assert ensure_source(cfg, tmp_path) == target
    assert "training" not in capsys.readouterr().out
    target.with_suffix(".json").unlink()  # an unfinished training (no summary yet) is completed instead
    with pytest.raises(AssertionError, match="trained again"):
        ensure_source(cfg, tmp_path)
