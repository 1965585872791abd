import math

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
