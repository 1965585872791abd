"""The fast path changes how passes run, never what a step computes beyond bf16 rounding."""
import pytest
import torch

from grata.adapters import build_adapter
from grata.models import ResUNet, ModelConfig
from grata.norm import image_moments
from grata.speed import Plan, Speed, native_bf16
from grata.synthetic import SyntheticDomain, style_of

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return ResUNet(ModelConfig(encoder="resnet18", decoder_width=16)).eval()


@pytest.fixture(scope="module")
def fundus_like():
    ds = SyntheticDomain("gamma", n=4, size=64)
    return [ds[i].image[None] for i in range(4)]


def run(adapter, images):
    return [(adapter.adapt_and_predict(x), dict(adapter.last_step)) for x in images]


@pytest.mark.parametrize("bad, match", [({"precision": "fp16"}, "speed.precision"),
                                        ({"grad_precision": "half"}, "speed.grad_precision"),
                                        ({"batch_views": "yes"}, "speed.batch_views")])
def test_bad_speed_settings_name_the_setting(bad, match):
    with pytest.raises(ValueError, match=match):
        Speed(**bad)


def test_presets_and_overrides():
    assert Speed.named("faithful") == Speed("fp32", "fp32", False, "off")
    assert Speed.named({"preset": "faithful", "channels_last": True}).channels_last
    assert Speed.named({"precision": "fp32"}).grad_precision == "auto"
    with pytest.raises(ValueError, match="speed='turbo'"):
        Speed.named("turbo")


def test_plans_for_this_cpu():
    faithful = Plan.resolve(Speed.named("faithful"), CPU)
    assert not (faithful.bf16 or faithful.grad_bf16 or faithful.channels_last or faithful.batch_views)
    fast = Plan.resolve(Speed.named("fast"), CPU)
    assert fast.bf16 == fast.grad_bf16 == native_bf16(CPU)  # bf16 only where it is native
    assert fast.channels_last and not fast.batch_views  # views one at a time on a CPU
    assert Plan.resolve(Speed(batch_views="on"), CPU).batch_views


def test_image_moments_match_var_mean():
    x = torch.randn(3, 5, 7, 9, generator=torch.Generator().manual_seed(0)) * 2 + 1
    var, mean = torch.var_mean(x, dim=(2, 3), correction=0)
    for t in (x, x.contiguous(memory_format=torch.channels_last)):
        m1, m2 = image_moments(t)
        torch.testing.assert_close(m1, mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m2, var + mean**2, rtol=1e-5, atol=1e-5)
    one = torch.randn(2, 4, 1, 1)
    m1, m2 = image_moments(one)
    torch.testing.assert_close(m1, one.view(2, 4))  # a 1x1 map: its one value is the mean,
    torch.testing.assert_close(m2, one.view(2, 4) ** 2)  # and its square the second moment (no variance term)


def test_channels_last_alone_gives_the_faithful_step(unet, fundus_like):
    faithful = build_adapter("grata", unet, lr=1e-3, bn="image", speed="faithful")
    layout = build_adapter("grata", unet, lr=1e-3, bn="image", speed={"preset": "faithful", "channels_last": True})
    assert next(layout.model.parameters()).is_contiguous(memory_format=torch.channels_last)
    for (a, sa), (b, sb) in zip(run(faithful, fundus_like), run(layout, fundus_like)):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
        assert sa["cosine"] == pytest.approx(sb["cosine"], abs=1e-3)


def test_bf16_step_keeps_masks_and_fp32_state(unet, fundus_like):
    faithful = build_adapter("grata", unet, lr=1e-3, bn="image", speed="faithful")
    fast = build_adapter("grata", unet, lr=1e-3, bn="image", speed={"precision": "bf16", "grad_precision": "bf16"})
    assert fast.plan.bf16 and fast.plan.grad_bf16
    convs = [m for m in fast.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.weight.dtype == torch.bfloat16 for c in convs)  # frozen weights cast once
    assert all(p.dtype == torch.float32 and p.requires_grad for p in fast.params)  # what adapts stays fp32
    for (a, sa), (b, sb) in zip(run(faithful, fundus_like), run(fast, fundus_like)):
        assert a.dtype == b.dtype == torch.float32
        agree = ((a > 0) == (b > 0)).float().mean().item()
        assert agree > 0.97, f"bf16 flipped {1 - agree:.1%} of the mask pixels"
        assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.99
        assert sa["cosine"] == pytest.approx(sb["cosine"], abs=0.05)
    # Four Adam steps at an effective rate of about 1e-4 move each parameter by about 4e-4, so the
    # parameters themselves are compared by how they moved, not by an absolute tolerance that a fast
    # path which never stepped would also meet.
    source = torch.cat([p.detach().flatten() for p in build_adapter("grata", unet, speed="faithful").params])
    moved_fast = torch.cat([p.detach().flatten() for p in fast.params]) - source
    moved_ref = torch.cat([p.detach().flatten() for p in faithful.params]) - source
    assert moved_ref.abs().max() > 1e-4  # the reference did step
    ratio = (moved_fast.norm() / moved_ref.norm()).item()
    assert 0.8 < ratio < 1.25, f"the fast path moved the parameters {ratio:.2f} times as far as fp32"
    # bf16 gradients flip Adam's direction on parameters whose gradient is near zero; the movement as a
    # whole still points the same way (measured: cosine 0.68; a sign error gives -0.68, no step NaN)
    cosine = torch.nn.functional.cosine_similarity(moved_fast, moved_ref, dim=0).item()
    assert cosine > 0.5, f"the fast path moved the parameters elsewhere (cosine {cosine:.2f})"


def test_state_moves_between_fast_and_faithful_sites(unet, fundus_like):
    fast = build_adapter("grata", unet, lr=1e-3, bn="site", speed={"precision": "bf16", "grad_precision": "bf16"})
    run(fast, fundus_like[:2])
    faithful = build_adapter("grata", unet, lr=1e-3, bn="site", speed="faithful")
    faithful.load_state_dict(fast.state_dict())
    for a, b in zip(fast.params, faithful.params):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)
    assert faithful.norms[0].site_count.item() == 2
    # and it goes on from there: like a faithful site that saw the first two images itself, unlike a
    # site that starts afresh (site statistics, Adam's moments and the RNG all came across)
    own = build_adapter("grata", unet, lr=1e-3, bn="site", speed="faithful")
    run(own, fundus_like[:2])
    fresh = build_adapter("grata", unet, lr=1e-3, bn="site", speed="faithful")
    moved = faithful.adapt_and_predict(fundus_like[2])
    to_own = (moved - own.adapt_and_predict(fundus_like[2])).abs().mean()
    to_fresh = (moved - fresh.adapt_and_predict(fundus_like[2])).abs().mean()
    assert to_own < to_fresh / 5, (to_own, to_fresh)  # measured: 7e-6 against 2e-4
    assert faithful.norms[0].site_count.item() == 3
    assert all(s["step"].item() == 3 for s in faithful.optimizer.state_dict()["state"].values())


def test_reset_restores_the_source_on_the_fast_path(unet, fundus_like):
    fast = build_adapter("tent", unet, lr=1e-2, bn="image")
    before = fast.adapt_and_predict(fundus_like[0])
    run(fast, fundus_like[1:])
    fast.reset()
    torch.testing.assert_close(fast.adapt_and_predict(fundus_like[0]), before)


def test_more_synthetic_sites_of_one_style():
    assert style_of("gamma-3") == "gamma" and style_of("colour_cast") == "colour_cast"
    a, b = SyntheticDomain("gamma", n=1, size=64), SyntheticDomain("gamma-2", n=1, size=64)
    assert not torch.equal(a[0].image, b[0].image)  # another hospital, other images
    assert torch.equal(b[0].image, SyntheticDomain("gamma-2", n=1, size=64)[0].image)
    with pytest.raises(ValueError, match="gama-2"):
        SyntheticDomain("gama-2")
