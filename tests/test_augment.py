import torch

from grata.augment import WEAK_VIEWS, invert_views, strong_style, weak_views


def test_weak_views_invert_exactly():
    x = torch.rand(2, 3, 8, 8)
    views = weak_views(x)
    assert len(views) == 6 and torch.equal(views[0], x)
    assert all(not torch.equal(v, x) for v in views[1:])  # each view really moves pixels
    for back in invert_views(views):
        assert torch.equal(back, x)


def test_rotation_inverse_is_not_the_forward():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    rot90 = dict((n, (f, i)) for n, f, i in WEAK_VIEWS)["rot90"]
    assert not torch.equal(rot90[0](rot90[0](x)), x)
    assert torch.equal(rot90[1](rot90[0](x)), x)


def test_weak_views_need_square_images():
    try:
        weak_views(torch.rand(1, 3, 8, 16))
    except ValueError as exc:
        assert "square" in str(exc)
    else:
        raise AssertionError("non-square input accepted")


def test_strong_style_is_seeded_changes_style_and_rescales():
    x = torch.rand(4, 3, 16, 16)
    a = strong_style(x, torch.Generator().manual_seed(3))
    b = strong_style(x, torch.Generator().manual_seed(3))
    c = strong_style(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape
    flat = a.flatten(1)
    assert torch.allclose(flat.min(1).values, torch.zeros(4), atol=1e-6)
    assert torch.allclose(flat.max(1).values, torch.ones(4), atol=1e-6)
    assert (a - x).abs().mean() > 0.01
