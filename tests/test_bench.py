"""The benchmark suite's pieces measure what they say (timings are printed by bench/, never asserted)."""
import json
from pathlib import Path

import pytest

from bench.common import spread, table, write
from bench.federation import site_names
from bench.step import in_child, method_options, METHODS


def test_spread_and_table():
    s = spread([3.0, 1.0, 2.0, 4.0])
    assert s["median"] == 2.5 and s["min"] == 1.0 and s["max"] == 4.0 and s["n"] == 4 and s["q1"] <= s["q3"]
    md = table([{"a": "x", "b": 1.234}, {"a": "y", "b": None}], [("a", "name", ""), ("b", "value", ".1f")])
    assert md.splitlines() == ["| name | value |", "|---|---:|", "| x | 1.2 |", "| y | - |"]


def test_results_carry_the_machine(tmp_path):
    path = write("probe", {"rows": [1]}, tmp_path)
    data = json.loads(path.read_text())
    assert data["rows"] == [1] and data["machine"]["torch"] and data["machine"]["cores"] >= 1


def test_every_method_preset_is_benchmarked():
    """The presets are read from conf/method/ itself, not from the benchmark's own list."""
    presets = {p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "method").glob("*.yaml")}
    assert {"source", "source_views", "fedgrata", "grata_paper"} <= presets  # the folder is where we think
    missing = presets - set(METHODS)
    assert not missing, f"presets the step benchmark leaves out: {sorted(missing)}"
    for name in METHODS:
        adapter, options = method_options(name)
        assert adapter in ("source", "bn", "tent", "sar", "grata") and isinstance(options, dict)


def test_a_preset_step_job_runs_in_process():
    """source_views (the weak-view ensemble, no update) through the same job the benchmark times."""
    from bench.step import run_step

    r = run_step({"kind": "step", "method": "source_views", "encoder": "resnet18", "size": 32, "speed": "faithful",
                  "warmup": 0, "repeats": 1, "threads": 1, "device": "cpu"})
    assert r["s_per_image"]["n"] == 1 and r["images_per_s"] > 0


def test_more_sites_than_styles_get_their_own_names():
    names = site_names(9)
    assert names[:4] == ["colour_cast", "gamma", "low_contrast", "uneven_light"]
    assert names[4:] == ["colour_cast-1", "gamma-1", "low_contrast-1", "uneven_light-1", "colour_cast-2"]
    assert len(set(site_names(16))) == 16


@pytest.mark.parametrize("speed", ["faithful", "fast"])
def test_one_step_job_runs_in_its_own_process(speed):
    job = {"kind": "step", "method": "tent", "encoder": "resnet18", "size": 64, "speed": speed,
           "warmup": 1, "repeats": 2, "threads": 1, "device": "cpu"}
    r = in_child(job)
    assert r["s_per_image"]["n"] == 2 and r["images_per_s"] > 0 and r["peak_mib"] > 0
    assert r["plan"]["channels_last"] == (speed == "fast")


def _dump_row(dice_adapted: float, dice_source: float, round_disc: bool, switched: bool) -> dict:
    """A bench.quality_dump row: the adapted prediction's shape features, the source's (src_), both Dice."""
    good = dict(disc_ellipse=0.95, disc_solidity=0.95, cup_solidity=0.9, cup_in_disc=1.0, disc_largest=1.0,
                cup_largest=1.0, cdr=0.5)
    torn = {**good, "disc_ellipse": 0.3, "disc_solidity": 0.4}
    adapted, source = (good, torn) if round_disc else (torn, good)
    return {**adapted, **{f"src_{k}": v for k, v in source.items()}, "dice_mean_adapted": dice_adapted,
            "dice_mean_source": dice_source, "step_bn_image": float(switched)}


def test_the_switch_shape_study_reads_the_image_statistics_rows(tmp_path):
    """The rule is judged on the images predicted with image statistics only, and scored by the labels."""
    import gzip

    from bench.switch_shape import main

    dumps = tmp_path / "dumps"
    dumps.mkdir()
    styles = {"helps": [_dump_row(85, 20, True, True)] * 6,   # image statistics: round discs, better Dice
              "hurts": [_dump_row(25, 38, False, True)] * 6,  # torn discs, worse Dice: the rule vetoes
              "misled": [_dump_row(25, 38, True, True)] * 6,  # round discs but worse Dice: the rule is wrong
              "stays": [_dump_row(90, 90, True, False)] * 6}  # never switched: not judged
    for name, rows in styles.items():
        (dumps / f"fedgrata_{name}.json.gz").write_bytes(gzip.compress(json.dumps(rows).encode()))
    result = main(["--dumps", str(dumps), "--out", str(tmp_path), "--name", "probe"])
    verdicts = {r["style"]: (r["rule"], r["labels"]) for r in result["rows"]}
    assert verdicts == {"helps": ("switch", "switch"), "hurts": ("veto", "veto"), "misled": ("switch", "veto"),
                        "stays": ("n/a", "n/a")}
    assert (result["right"], result["judged"]) == (2, 3)


def test_geometry_dice_refuses_a_malformed_variant_before_any_work():
    from bench.geometry_dice import main

    with pytest.raises(SystemExit, match="'broken'"):
        main(["--methods", "--variants", '{"broken": {"options": {}}}'])


def _per_image(folder: Path, cells: dict[tuple[str, str], list[tuple[float, float]]]) -> Path:
    """An evaluate run folder whose per_image.csv holds (dice, quality) per image for each (method, target)."""
    folder.mkdir()
    lines = ["image,method,target,dice_mean,quality"]
    lines += [f"{t}_{i},{m},{t},{d},{q}" for (m, t), vals in cells.items() for i, (d, q) in enumerate(vals)]
    (folder / "per_image.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_the_source_draws_study_scores_each_bar_from_the_per_image_rows(tmp_path):
    """Gain, per-image Spearman and the proxy's pair order come from the rows, and a draw is judged on each bar."""
    from bench.source_draws import SITES, main

    truth = {"RIM_ONE_r1": 88.0, "RIM_ONE_r3": 85.0, "Drishti_GS": 87.0, "RIM_ONE_r2": 86.0}
    ramp = [-2.0, -1.0, 0.0, 1.0, 2.0]
    cells = {}
    for t in SITES:
        cells[("source", t)] = [(truth[t] - 2 + r, 80 - r) for r in ramp]  # estimate anti-ranked: rho -1
        cells[("fedgrata", t)] = [(truth[t] + r, truth[t] + r) for r in ramp]  # estimate exact: rho 1, every pair
    cells[("fedgrata", "Drishti_GS")] = [(78.0 + r, 90 + r) for r in ramp]  # -2 vs source, proxy reads it first
    run = _per_image(tmp_path / "run", cells)
    out = main(["--draw", "d0", str(run), "--out", str(tmp_path), "--name", "probe"])
    s = out["summaries"]["d0"]
    assert s["gain"]["RIM_ONE_r1"] == pytest.approx(2.0) and s["gain"]["Drishti_GS"] == pytest.approx(-7.0)
    assert s["sites"]["RIM_ONE_r3"]["fedgrata"]["spearman"] == pytest.approx(1.0)
    assert s["sites"]["RIM_ONE_r3"]["source"]["spearman"] == pytest.approx(-1.0)
    assert not s["table_bar_met"] and s["spearman_bar_met"]
    assert s["proxy_pairs"] == 3  # Drishti_GS truly last but read first: its 3 pairs are wrong
    assert (tmp_path / "probe.json").is_file()


def test_the_source_draws_study_names_a_missing_site(tmp_path):
    from bench.source_draws import main

    run = _per_image(tmp_path / "run", {("source", "RIM_ONE_r1"): [(80.0, 70.0)] * 3})
    with pytest.raises(SystemExit, match="no rows for"):
        main(["--draw", "d0", str(run), "--out", str(tmp_path)])


def test_the_source_draws_study_takes_one_method_from_a_folder(tmp_path):
    """FOLDER:METHOD: a variant's run is scored against the source rows of another run, not its own."""
    from bench.source_draws import SITES, main

    ramp = [-1.0, 0.0, 1.0]
    base = _per_image(tmp_path / "base", {**{("source", t): [(80 + r, 80 + r) for r in ramp] for t in SITES},
                                          **{("fedgrata", t): [(10 + r, 10 + r) for r in ramp] for t in SITES}})
    variant = _per_image(tmp_path / "variant", {**{("source", t): [(50 + r, 50 + r) for r in ramp] for t in SITES},
                                                **{("fedgrata", t): [(83 + r, 83 + r) for r in ramp] for t in SITES}})
    out = main(["--draw", "v", f"{base}:source", f"{variant}:fedgrata", "--out", str(tmp_path), "--name", "probe"])
    assert out["summaries"]["v"]["gain_mean"] == pytest.approx(3.0)
