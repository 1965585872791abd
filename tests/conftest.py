import os
from pathlib import Path

import pytest
import torch
from torch import nn

torch.set_num_threads(min(2, os.cpu_count() or 1))

FUNDUS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fundus"


class TinyNet(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN -> 1x1 conv: enough to exercise every adapter quickly."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                  nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 2, 1))

    def forward(self, x):
        return self.body(x)


@pytest.fixture(autouse=True)
def _own_environment():
    """Each test starts from the same environment: code under test may set variables (the MLflow tracker
    sets its retry bounds with setdefault), and a later test must not inherit them."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def _own_rng():
    """Each test draws from torch's global generator as if it ran alone: seeded at its start, and what
    it draws does not move the generator for the tests after it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    m = TinyNet()
    with torch.no_grad():  # non-trivial source statistics and affine parameters
        for layer in m.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.running_mean.uniform_(-0.2, 0.2)
                layer.running_var.uniform_(0.5, 1.5)
                layer.weight.uniform_(0.5, 1.5)
                layer.bias.uniform_(-0.2, 0.2)
    return m.eval()


@pytest.fixture
def image():
    return torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def fundus_root() -> Path:
    if not FUNDUS.is_dir():
        pytest.skip("../shared/data/fundus is not present")
    return FUNDUS


# --- the federation's tiny in-process setup (test_federation, test_faults) -------------------------
from grata.models import ModelConfig, ResUNet, save_checkpoint  # noqa: E402
from server.config import load_config  # noqa: E402
from server.federation import federate  # noqa: E402
from server.inline_grid import InlineGrid  # noqa: E402

SIZE = 32


def tiny_source(path: Path, shift_reference: float) -> Path:
    """A seeded random ResUNet-18 saved with a shift reference and a quality model fitted on 4 synthetic images."""
    from grata.quality import fit_quality
    from grata.synthetic import SyntheticDomain

    torch.manual_seed(0)
    model = ResUNet(ModelConfig(encoder="resnet18", decoder_width=16)).eval()
    samples = [SyntheticDomain("clean", n=4, size=SIZE, split="train")[i] for i in range(4)]
    quality = fit_quality(model, torch.stack([s.image for s in samples]), torch.stack([s.mask for s in samples]),
                          limit=4, copies=1)
    save_checkpoint(path, model, shift_reference=shift_reference, quality=quality)
    return path


def partner_node(tmp_path: Path, folder: Path, checkpoint: Path) -> dict:
    """The node config of a deployed, unlabelled partner site with its own privacy limits (client/limits.py)."""
    from client.site import load_source

    return {"data-root": str(folder), "data-kind": "folder", "site": "partner", "state-dir": str(tmp_path / "state"),
            "max-epsilon": 8.0, "max-delta": 1e-5, "min-noise-multiplier": 0.0, "min-images": 1,
            "ledger-dir": str(tmp_path / "ledger"), "source-digest": load_source(checkpoint)[2]}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A small random ResUNet-18 standing in for a trained source model; bn=auto never switches."""
    path = tiny_source(tmp_path_factory.mktemp("ckpt") / "source.pt", shift_reference=1e9)  # 1x1 maps at 32 px
    path.with_suffix(".json").write_text("{}")
    return complete(path)


def complete(path: Path) -> Path:
    """The checkpoint as the coordinator runs it (ensure_source writes the geometry reference and the
    current quality model in), so that a digest pinned from it is the one the coordinator announces
    and no test's run rewrites the shared file under the next one."""
    from grata.train_source import ensure_source

    return ensure_source(tiny_config(path.parent, path), None)


def tiny_config(tmp: Path, checkpoint: Path, *overrides: str):
    return load_config([
        "engine=inline", f"data.size={SIZE}", "data.synthetic_test=4", "data.sites=[colour_cast,gamma]",
        "model.encoder=resnet18", "model.decoder_width=16", f"checkpoint={checkpoint}", "federation.rounds=2",
        f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db", f"out_dir={tmp}/runs", "mlflow.overlays=1", *overrides])


class RecordingGrid(InlineGrid):
    """Keeps every reply a site sent, to audit exactly what left it, and every message it was sent."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.replies, self.sent = [], []

    def _handle(self, msg):  # every reply that left a site, also one a round timeout then left out
        self.sent.append(msg)
        reply = super()._handle(msg)
        if reply.metadata.message_type == "train":
            self.replies.append(reply)
        return reply


def run_tiny(tmp: Path, checkpoint: Path, *overrides: str) -> tuple[dict, "RecordingGrid"]:
    from client.client_app import app as client_app

    cfg = tiny_config(tmp, checkpoint, *overrides)
    grid = RecordingGrid(client_app, [{"partition-id": i, "num-partitions": 2} for i in range(2)])
    return federate(grid, cfg, tmp), grid


