"""Source training: an interrupted run resumes from its last checkpoint and ends where an uninterrupted one does."""
import json

import pytest
import torch

import grata.train_source as ts
from grata.config import DataConfig, TrainConfig
from grata.models import ModelConfig, load_checkpoint


def tiny(path, epochs=2):
    return ts.TrainSourceConfig(
        data=DataConfig(kind="synthetic", size=64, source="clean", synthetic_train=12, synthetic_test=4),
        model=ModelConfig(encoder="resnet18"), train=TrainConfig(epochs=epochs, batch_size=4), checkpoint=str(path))


def test_interrupted_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    straight = ts.train(tiny(tmp_path / "straight.pt"))
    assert len(straight["history"]) == 2 and 0 <= straight["in_domain_test"]["dice_mean"] <= 100
    summary = json.loads((tmp_path / "straight.json").read_text())
    assert summary["in_domain_test"] == straight["in_domain_test"] and summary["test_images"] == 4

    real_save, calls = ts.save_checkpoint, []

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        calls.append(1)
        raise KeyboardInterrupt  # the machine goes away right after epoch 1 is safely on disk

    monkeypatch.setattr(ts, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        ts.train(tiny(tmp_path / "resumed.pt"))
    assert load_checkpoint(tmp_path / "resumed.pt")[1]["epoch"] == 1
    monkeypatch.setattr(ts, "save_checkpoint", real_save)
    resumed = ts.train(tiny(tmp_path / "resumed.pt"))
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    a, _ = load_checkpoint(tmp_path / "straight.pt")
    b, _ = load_checkpoint(tmp_path / "resumed.pt")
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k


def test_resume_refuses_a_checkpoint_of_another_configuration(tmp_path):
    ts.train(tiny(tmp_path / "m.pt", epochs=1))
    other = tiny(tmp_path / "m.pt", epochs=1)
    other.train.lr = 0.5
    with pytest.raises(ValueError, match="another configuration"):
        ts.train(other)


def test_a_checkpoint_from_before_the_geometry_step_gets_its_disc_scale_not_new_weights(tmp_path):
    """ensure_source completes an old checkpoint with the source's disc geometry measured on its training
    masks, in the file itself, without retraining: the weights stay (the source digest, which covers the
    metadata a site acts on, changes: a site pins the completed checkpoint)."""
    from grata.federation.siteconfig import weights_digest
    from tests.conftest import SIZE, tiny_source

    path = tiny_source(tmp_path / "old.pt", shift_reference=1.0)
    path.with_suffix(".json").write_text("{}")
    before, meta = load_checkpoint(path)
    assert "geometry" not in meta
    data = DataConfig(kind="synthetic", size=SIZE, synthetic_train=6)
    cfg = ts.TrainSourceConfig(data=data, model=ModelConfig(encoder="resnet18", decoder_width=16), checkpoint=str(path))
    assert ts.ensure_source(cfg, None) == path
    after, meta = load_checkpoint(path)
    assert 0.02 < meta["geometry"]["disc_share"] < 0.6 and meta["geometry"]["images"] == 6
    assert weights_digest(after) == weights_digest(before) and "quality" in meta
