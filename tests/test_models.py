import pytest
import torch

from grata.models import CheckpointError, ModelConfig, build_model, load_checkpoint, save_checkpoint


@pytest.mark.parametrize("encoder,blocks", [("resnet18", 2 + 2 + 2 + 2), ("resnet34", 3 + 4 + 6 + 3)])
def test_resunet_shapes_and_depth(encoder, blocks):
    model = build_model(encoder).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, 2, 64, 64)
    stages = [model.encoder.layer1, model.encoder.layer2, model.encoder.layer3, model.encoder.layer4]
    assert sum(len(s) for s in stages) == blocks
    assert model.head[0].out_channels == 32 and model.head[-1].out_channels == 2


def test_size_must_be_multiple_of_32():
    with pytest.raises(ValueError, match="multiple of 32"):
        build_model("resnet18")(torch.rand(1, 3, 48, 48))


def test_checkpoint_round_trip_and_strict_mismatch(tmp_path):
    model = build_model("resnet18")
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, epoch=3)
    loaded, meta = load_checkpoint(path)
    assert meta["epoch"] == 3 and loaded.config == model.config
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(CheckpointError, match=r"m\.pt holds .*resnet18.*asks for .*resnet34"):
        load_checkpoint(path, expect=ModelConfig(encoder="resnet34"))


def test_partial_or_corrupt_checkpoint_is_an_error(tmp_path):
    model = build_model("resnet18")
    payload = {"model_config": {"encoder": "resnet18", "num_classes": 2, "decoder_width": 256},
               "state_dict": {k: v for i, (k, v) in enumerate(model.state_dict().items()) if i}}
    torch.save(payload, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="partial.pt does not match"):
        load_checkpoint(tmp_path / "partial.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")
    with pytest.raises(ValueError, match="model.encoder"):
        ModelConfig(encoder="vgg")
