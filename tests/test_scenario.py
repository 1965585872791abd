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
