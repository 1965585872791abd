"""The BN statistics policy: each named policy against plain BatchNorm computations."""
import copy

import pytest
import torch
from torch import nn

from grata.norm import AdaptiveNorm, StatsPolicy


def make_bn(c=4):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn.eval()


def per_image_bn(bn, x):
    ref = copy.deepcopy(bn).train()
    return torch.cat([ref(x[i : i + 1]) for i in range(len(x))])


def test_image_policy_uses_each_images_own_statistics_in_a_batch():
    bn, x = make_bn(), torch.randn(3, 4, 5, 5) * 3 + 1
    out = AdaptiveNorm(bn, StatsPolicy.named("image"))(x)
    torch.testing.assert_close(out, per_image_bn(bn, x))


def test_source_policy_equals_eval_mode_bn():
    bn, x = make_bn(), torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(AdaptiveNorm(bn, StatsPolicy.named("source"))(x), bn(x))


def test_mixed_policy_mixes_moments():
    bn, x = make_bn(), torch.randn(1, 4, 6, 6) * 2 + 0.5
    w = 0.7
    out = AdaptiveNorm(bn, StatsPolicy.named("mixed", source_weight=w))(x)
    mean_i, var_i = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    m1 = w * bn.running_mean + (1 - w) * mean_i
    m2 = w * (bn.running_var + bn.running_mean**2) + (1 - w) * (var_i + mean_i**2)
    var = m2 - m1**2
    want = (x - m1.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(out, want)


def test_site_policy_tracks_the_stream_mean():
    bn = make_bn()
    layer = AdaptiveNorm(bn, StatsPolicy.named("site", source_weight=0.0))
    xs = [torch.randn(1, 4, 5, 5) * (i + 1) + i for i in range(3)]
    for x in xs:
        layer.observe_next = True
        layer(x)
    means = torch.stack([x.mean((0, 2, 3)) for x in xs])
    m2 = torch.stack([x.var((0, 2, 3), unbiased=False) + x.mean((0, 2, 3)) ** 2 for x in xs])
    torch.testing.assert_close(layer.site_m1, means.mean(0))
    torch.testing.assert_close(layer.site_m2, m2.mean(0))
    assert int(layer.site_count) == 3
    # a pass not marked as the image's own does not move the estimate
    before = layer.site_m1.clone()
    layer(torch.randn(1, 4, 5, 5) * 10)
    assert torch.equal(layer.site_m1, before)


def test_site_policy_with_one_image_and_no_source_weight_equals_image_policy():
    bn, x = make_bn(), torch.randn(1, 4, 5, 5) * 2
    layer = AdaptiveNorm(bn, StatsPolicy.named("site", source_weight=0.0))
    layer.observe_next = True
    torch.testing.assert_close(layer(x), per_image_bn(bn, x), rtol=1e-4, atol=1e-5)


def test_pooled_statistics_enter_as_one_more_input():
    bn, x = make_bn(), torch.randn(1, 4, 5, 5)
    layer = AdaptiveNorm(bn, StatsPolicy(source=0.0, image=0.0, pooled=1.0))
    m1, var = torch.tensor([0.1, -0.2, 0.3, 0.0]), torch.tensor([1.0, 2.0, 0.5, 1.5])
    layer.set_pooled(m1, var + m1**2)
    ref = copy.deepcopy(bn)
    ref.running_mean.copy_(m1)
    ref.running_var.copy_(var)
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [dict(source=-1.0), dict(source=0.0, image=0.0), dict(site_momentum=2.0)])
def test_bad_policies_are_refused(bad):
    with pytest.raises(ValueError):
        StatsPolicy(**bad)
    with pytest.raises(ValueError, match="bn policy"):
        StatsPolicy.named("nope")
