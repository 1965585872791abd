"""Scenarios: hospitals cut from one domain are disjoint, complete and reproducible; the Hydra group
sets the sites per data kind; a bad hospital list is an error naming it."""
import pytest

from grata.config import DataConfig, open_domain
from grata.scenario import hospital, kind_of, split_indices
from server.config import load_config

from .test_data import write_case, write_csv


def test_split_is_disjoint_complete_and_seeded():
    parts = [split_indices(37, 3, k, "D/all", seed=0) for k in range(3)]
    assert sorted(i for p in parts for i in p) == list(range(37))  # every image once
    assert [len(p) for p in parts] == [13, 12, 12]
    assert parts == [split_indices(37, 3, k, "D/all", seed=0) for k in range(3)]  # reproducible
    assert parts != [split_indices(37, 3, k, "D/all", seed=1) for k in range(3)]  # and seeded
    assert parts[0] != list(range(0, 37, 3))  # shuffled, not the domain's first images dealt in order


def test_names():
    assert hospital("Drishti_GS-b") == ("Drishti_GS", 1) and hospital("RIM_ONE_r1") == ("RIM_ONE_r1", None)
    assert kind_of("gamma-c") == kind_of("gamma-2") == kind_of("gamma") == "gamma"


def test_fundus_hospitals_read_disjoint_images(tmp_path):
    rows = [write_case(tmp_path, f"i{k}") for k in range(7)]
    write_csv(tmp_path / "D_test.csv", rows)
    data = DataConfig(kind="fundus", root=str(tmp_path), size=32, sites=["D-a", "D-b", "other"])
    a, b = (open_domain(data, s, "test") for s in ("D-a", "D-b"))
    names = [a[i].name for i in range(len(a))], [b[i].name for i in range(len(b))]
    assert len(names[0]) + len(names[1]) == 7 and not set(names[0]) & set(names[1])
    with pytest.raises(ValueError, match="not among data.sites"):
        open_domain(data, "D-c", "test")
    gap = DataConfig(kind="fundus", root=str(tmp_path), size=32, sites=["D-a", "D-c"])
    with pytest.raises(ValueError, match="without gaps"):
        open_domain(gap, "D-a", "test")


def test_synthetic_hospitals_render_their_own_images():
    data = DataConfig(kind="synthetic", size=32, synthetic_test=2, sites=["gamma-a", "gamma-b"])
    a, b = (open_domain(data, s, "test") for s in ("gamma-a", "gamma-b"))
    assert a.style == b.style == "gamma" and not (a[0].image == b[0].image).all()


@pytest.mark.parametrize("name, kind, n", [("distinct", "synthetic", 4), ("vendors", "synthetic", 12),
                                           ("vendors", "fundus", 9), ("late_joiner", "synthetic", 12)])
def test_scenario_group_sets_the_sites(name, kind, n):
    cfg = load_config([f"scenario={name}", *(["data=fundus"] if kind == "fundus" else [])])
    assert len(cfg.data.sites) == n and cfg.scenario.name == name
    per_kind = getattr(cfg.scenario, kind)
    if name == "vendors" and kind == "synthetic":  # 4-8 images a round
        assert 4 <= cfg.data.synthetic_test / cfg.federation.rounds <= 8
    if name == "late_joiner":
        assert per_kind.join_round and all(r == 3 for r in per_kind.join_round.values())


def test_join_round_must_name_a_site():
    with pytest.raises(Exception, match="join_round"):
        load_config(["scenario=late_joiner", "+scenario.synthetic.join_round.nowhere=3"])


def test_the_study_checks_the_issue_targets_against_local_only():
    from bench.federation_study import targets

    def row(sites, mean, eps=8.0, private=True, **kw):
        return {"sites": sites, "dice_mean": mean, "epsilon": eps, "private": private, **kw}

    base = row({"a": 80.0, "b": 60.0}, 70.0, private=False, joiners_first_round=50.0)
    good = row({"a": 81.5, "b": 60.8}, 71.15, joiners_first_round=52.5)
    hurts = row({"a": 84.0, "b": 59.0}, 71.5)  # +1.5 on the mean, but one site 1.0 below
    exact = row({"a": 81.5, "b": 60.8}, 71.15, eps=0.0, private=False)  # shares exact values: no epsilon claim
    t = targets("vendors", {"local_only": base, "good": good, "hurts": hurts, "exact": exact})
    assert t["good"]["met"] and not t["hurts"]["met"] and not t["exact"]["met"]
    assert targets("distinct", {"local_only": base, "x": row({"a": 79.8, "b": 60.0}, 69.9)})["x"]["met"]
    assert not targets("distinct", {"local_only": base, "x": row({"a": 79.6, "b": 61.0}, 70.3)})["x"]["met"]
    late = targets("late_joiner", {"local_only": base, "good": good})["good"]
    assert late["joiners_gain"] == 2.5 and late["met"]


def test_the_controls_table_credits_federation_only_its_gain_over_the_local_control():
    """A shared trick that a site gets alone (control == federated) shows +0.00 however far it is above
    local_only; the worst site is taken against the control, not against the base."""
    from bench.federation_controls import table

    base = {"mean": 60.0, "sites": {"a": 60.0, "b": 60.0}}
    local = {"mean": 68.0, "sites": {"a": 70.0, "b": 66.0}}
    fed = {"mean": 68.5, "sites": {"a": 71.5, "b": 65.5}}
    row = table(base, [("lookahead", local, fed)]).splitlines()[-1]
    assert row == "| lookahead | 68.00 | 68.50 | +8.00 | +0.50 | -0.50 |"
    same = table(base, [("x", local, local)]).splitlines()[-1]
    assert "| +8.00 | +0.00 | +0.00 |" in same
