"""The geometry step's probe is the adapter's own first pass when the step segments what it looked at:
the same predictions and state as a separate probe, fewer passes, and nothing left by an unused probe."""
from __future__ import annotations

import pytest
import torch

from grata.adapters import build_adapter
from grata.geometry import GeometryStep
from tests.test_geometry import REF, _disc_image

S = 64
# kept whole (a disc at about the source's share), a small disc in a wide field, one in between
IMAGES = [_disc_image(*where, size=S, seed=i)[0][None] for i, where in
          enumerate([(0.5, 0.5, 0.25), (0.35, 0.6, 0.06), (0.45, 0.55, 0.16), (0.5, 0.5, 0.26)])]


def _separate_probe(adapter):
    """The behaviour before the reuse: a no-grad pass of its own, never the step's."""
    def probe(x):
        with torch.no_grad():
            return adapter.forward(x)
    return probe


def _count_passes(adapter) -> list[int]:
    calls = [0]
    adapter.model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _run(adapter, separate: bool, reuse_settled: bool = False):
    adapter.geometry = GeometryStep(REF, reuse_settled=reuse_settled)
    if separate:
        adapter._first_pass = _separate_probe(adapter)
    calls = _count_passes(adapter)
    outs, extra, probes = [], 0.0, 0.0
    for x in IMAGES:
        outs.append(adapter.adapt_and_predict(x))
        extra += adapter.last_step["geo_extra_passes"]
        probes += adapter.last_step["geo_probes"]
    return torch.cat(outs), adapter.state_dict(), calls[0], extra, probes


@pytest.mark.parametrize("name,kw", [("source", {}), ("bn", {}), ("tent", {}), ("sar", {}),
                                     ("grata", {"bn": "auto", "shift_reference": 1.0, "auto_warmup": 1}),
                                     ("grata", {"aux": "consis", "pse": "ent"})])
@pytest.mark.parametrize("reuse_settled", [False, True])
def test_the_probe_is_the_steps_first_pass_with_the_same_answer(tiny_model, name, kw, reuse_settled):
    make = lambda: build_adapter(name, tiny_model, geometry="auto", geometry_reference=REF, **kw)
    out, state, passes, extra, probes = _run(make(), separate=False, reuse_settled=reuse_settled)
    out_sep, state_sep, passes_sep, extra_sep, probes_sep = _run(make(), separate=True, reuse_settled=reuse_settled)
    assert torch.equal(out, out_sep)
    for key, value in state_sep["model"].items():  # BN affine, source, site and pooled statistics
        assert torch.equal(state["model"][key], value), key
    assert state["auto"] == state_sep["auto"] and torch.equal(state["generator"], state_sep["generator"])
    reused = probes - extra
    assert extra_sep == probes_sep and reused >= 1  # the kept-whole images reuse theirs at least
    assert passes_sep - passes == reused  # each reused probe is one model pass fewer, counted honestly


def test_an_unclaimed_probe_leaves_no_statistics_and_no_graph(tiny_model):
    probed, fresh = (build_adapter("tent", tiny_model, bn="image") for _ in range(2))
    probed._first_pass(IMAGES[1])  # looked at, then the step segments another input (a different crop)
    assert probed._primed is not None and probed._primed[2].requires_grad
    out = probed.adapt_and_predict(IMAGES[2])
    assert probed._primed is None and probed.primed_used == 0
    assert all(layer.pending is None for layer in probed.norms)  # its held-back BN inputs are not kept either
    assert torch.equal(out, fresh.adapt_and_predict(IMAGES[2]))
    for key, value in fresh.state_dict()["model"].items():
        assert torch.equal(probed.state_dict()["model"][key], value), key


def test_under_the_site_policy_the_probe_is_a_pass_of_its_own(tiny_model):
    """There the image's own pass updates the site statistics before it normalises with them, so a
    probe (which must not update them) cannot be that pass."""
    adapter = build_adapter("bn", tiny_model, bn="site", site_momentum=0.1)
    before = adapter.state_dict()["model"]
    adapter._first_pass(IMAGES[0])
    assert adapter._primed is None
    for key, value in before.items():
        assert torch.equal(adapter.state_dict()["model"][key], value), key
