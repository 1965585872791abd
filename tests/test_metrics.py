import math

import pytest
import torch

from grata.metrics import average_surface_distance, dice, score


def masks(*coords, size=6):
    m = torch.zeros(size, size, dtype=torch.bool)
    for r, c in coords:
        m[r, c] = True
    return m


def test_dice_matches_hand_count():
    p = masks((0, 0), (0, 1), (1, 0), (1, 1))
    g = masks((0, 1), (1, 1), (2, 1), (3, 1))
    # |P∩G| = 2, |P| = |G| = 4 -> 100 * 4 / 8 = 50
    assert math.isclose(dice(p[None, None], g[None, None]).item(), 50.0, rel_tol=1e-6)
    empty = torch.zeros(1, 1, 6, 6, dtype=torch.bool)
    assert math.isclose(dice(empty, empty).item(), 100.0)  # both empty: (0+eps)/(0+eps)
    assert dice(p[None, None], empty).item() < 1e-3


def test_surface_distance_matches_hand_made_masks():
    one = masks((2, 1))[None, None]
    other = masks((2, 4))[None, None]
    assert math.isclose(average_surface_distance(one, other).item(), 3.0, rel_tol=1e-6)
    sq = masks((1, 1), (1, 2), (2, 1), (2, 2))[None, None]
    shifted = masks((1, 3), (1, 4), (2, 3), (2, 4))[None, None]
    # columns 1,2 vs 3,4: each square's pixels are 1 and 2 away from the other -> 1.5
    assert math.isclose(average_surface_distance(sq, shifted).item(), 1.5, rel_tol=1e-6)
    assert average_surface_distance(sq, sq).item() == 0.0
    # a filled 4x4 block: only its 12 rim pixels are boundary; vs itself shifted down one row
    block = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    block[..., 1:5, 1:5] = True
    down = block.roll(1, dims=2)
    # each direction: 6 of the 12 rim pixels lie on the other rim, 6 are 1 away -> (6 + 6) / 24
    assert math.isclose(average_surface_distance(block, down).item(), 0.5, rel_tol=1e-6)
    assert math.isnan(average_surface_distance(sq, torch.zeros_like(sq)).item())


def test_score_thresholds_logits_at_half():
    target = torch.zeros(1, 2, 6, 6)
    target[:, :, 2:4, 2:4] = 1
    logits = torch.where(target > 0, 3.0, -3.0)
    s = score(logits, target)
    assert s["dice_disc"][0] == s["dice_cup"][0] == s["dice_mean"][0]
    assert math.isclose(float(s["dice_mean"][0]), 100.0, rel_tol=1e-6)
    assert s["asd_disc"][0] == 0.0


def test_proxy_agreement_and_plausibility_on_hand_made_masks():
    from grata.proxy import dice_proxy

    disc = torch.zeros(1, 1, 8, 8)
    disc[..., 2:6, 2:6] = 0.9
    cup_in, cup_out = torch.zeros_like(disc), torch.zeros_like(disc)
    cup_in[..., 3:5, 3:5] = 0.8
    cup_out[..., 0:2, 0:2] = 0.8  # outside the disc: anatomically implausible
    good = torch.cat([disc, cup_in], 1)
    p = dice_proxy(good, good)
    assert p["agreement"] == pytest.approx(100) and p["plausibility"] == pytest.approx(100)
    bad = torch.cat([disc, cup_out], 1)
    p = dice_proxy(bad, good)
    assert p["plausibility"] == pytest.approx(0)
    assert p["agreement"] == pytest.approx(50)  # disc agrees (100), cup does not (0)
    assert p["dice_proxy"] == pytest.approx(0)
    # hard masks: a diffuse sub-threshold background does not drag the agreement down ...
    assert dice_proxy(good, torch.maximum(good, torch.full_like(good, 0.3)))["agreement"] == pytest.approx(100)
    # ... and a prediction that lost both structures agrees with nothing
    assert dice_proxy(good * 0.5, good)["agreement"] == pytest.approx(0)


def test_plausibility_wants_a_cup_inside_a_disc():
    from grata.proxy import plausibility

    disc = torch.zeros(1, 1, 8, 8)
    disc[..., 2:6, 2:6] = 1
    no_cup = torch.cat([disc, torch.zeros_like(disc)], 1)
    full_cup = torch.cat([disc, disc], 1)
    assert plausibility(no_cup) == 0 and plausibility(full_cup) == 0
    half_in = torch.zeros_like(disc)
    half_in[..., 1:3, 3:5] = 1  # 2 of its 4 pixels inside the disc
    assert plausibility(torch.cat([disc, half_in], 1)) == pytest.approx(50)
