"""A site that joins a running federation (federation.join_round), end to end on the inline grid."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from grata.federation.strategies import STRATEGIES
from tests.conftest import run_tiny


def test_a_late_joiner_adapts_its_whole_stream_from_the_newcomer_broadcast(tmp_path, checkpoint, monkeypatch):
    """gamma joins in round 2 of 3 (fed_affine, 6 images a site): it is asked nothing to adapt in
    round 1 and is absent from that round's table; it gets the average of round 1 (colour_cast's
    parameters) as its first broadcast, marked as its first round, and adapts all 6 of its images
    over rounds 2 and 3."""
    strategy = STRATEGIES["fed_affine"]
    calls, real = [], strategy.broadcast

    def spy(coord, site, rnd, reset, first):
        calls.append((site, rnd, first))
        return real(coord, site, rnd, reset, first)

    monkeypatch.setattr(strategy, "broadcast", spy)
    result, grid = run_tiny(tmp_path, checkpoint, "federation=fed_affine", "federation.rounds=3",
                            "data.synthetic_test=6", "federation.join_round={gamma:2}",
                            "federation.fallback_flag=1.0")  # a random tiny model may fall back often: never flag here
    assert sorted(calls) == [("colour_cast", 1, True), ("colour_cast", 2, False), ("colour_cast", 3, False),
                             ("gamma", 2, True), ("gamma", 3, False)]
    trained = {(r.content["site"]["name"], r.metadata.group_id) for r in grid.replies}
    assert trained == {("colour_cast", "1"), ("colour_cast", "2"), ("colour_cast", "3"), ("gamma", "2"), ("gamma", "3")}
    sites = result["sites"]
    assert sites["gamma"]["rounds"] == 2 and sites["colour_cast"]["rounds"] == 3
    assert sites["gamma"]["images"] == sites["colour_cast"]["images"] == 6  # the whole stream, over fewer rounds
    with (Path(result["run_dir"]) / "rounds.csv").open() as fh:
        rows = [(r["site"], r["round"]) for r in csv.DictReader(fh)]
    assert ("gamma", "1") not in rows and ("gamma", "2") in rows
    # gamma's first round started from round 1's average, i.e. colour_cast's adapted parameters
    first = next(r for r in grid.replies if r.content["site"]["name"] == "colour_cast" and r.metadata.group_id == "1")
    sent = [m for m in grid.sent if m.metadata.message_type == "train" and m.metadata.dst_node_id == 101]
    assert [int(m.content["config"]["round"]) for m in sent] == [2, 3]
    assert [int(m.content["config"]["joined"]) for m in sent] == [2, 2]
    warm = sent[0].content["affine"].to_torch_state_dict()
    ours = first.content["affine"].to_torch_state_dict()
    assert warm.keys() == ours.keys() and all(torch.allclose(warm[k], ours[k]) for k in ours)


def test_join_round_is_checked_before_any_work(tmp_path, checkpoint):
    from tests.conftest import tiny_config

    for bad, what in (("federation.join_round={north:2}", "north"), ("federation.join_round={gamma:3}", "join_round"),
                      ("federation.join_round={gamma:2,colour_cast:2}", "every site")):
        with pytest.raises(Exception, match=what):
            tiny_config(tmp_path, checkpoint, bad)
