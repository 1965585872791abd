"""The public adapter API that tests and outside tools rely on."""
import pytest
import torch

from grata.adapters import ADAPTERS, build_adapter
from grata.models import build_model


def test_documented_usage_on_resunet():
    model = build_model("resnet18").eval()
    images = torch.rand(1, 3, 64, 64)
    adapter = build_adapter("grata", model, lr=1e-4, aux="ent", pse="consis", bn="image")
    logits = adapter.adapt_and_predict(images)
    assert logits.shape == (1, 2, 64, 64) and not logits.requires_grad
    assert {"cosine", "lr", "loss_aux", "loss_pse", "entropy", "proxy"} <= set(adapter.last_step)
    assert 0 <= adapter.last_step["proxy"] <= 100
    assert -1 <= adapter.last_step["cosine"] <= 1
    assert 0 <= adapter.last_step["lr"] <= 1e-4
    adapter.reset()
    assert adapter.last_step == {} and adapter.images_seen == 0


@pytest.mark.parametrize("name", sorted(ADAPTERS))
@pytest.mark.parametrize("bn", ["image", "source", "mixed", "site"])
def test_every_adapter_runs_under_every_bn_policy(tiny_model, name, bn):
    adapter = build_adapter(name, tiny_model, bn=bn)
    x = torch.rand(2, 3, 16, 16)
    out = adapter.adapt_and_predict(x)
    assert out.shape == (2, 2, 16, 16) and torch.isfinite(out).all()
    assert adapter.describe()["bn"] == bn


def test_reset_restores_the_source_state(tiny_model, image):
    adapter = build_adapter("grata", tiny_model, lr=1e-2, aux="ent", pse="ent", bn="site")
    first = adapter.adapt_and_predict(image)
    for _ in range(3):
        adapter.adapt_and_predict(torch.rand(1, 3, 16, 16))
    assert not torch.allclose(adapter.adapt_and_predict(image), first)
    adapter.reset()
    torch.testing.assert_close(adapter.adapt_and_predict(image), first)


def test_state_round_trip_continues_identically(tiny_model, image):
    a = build_adapter("grata", tiny_model, lr=1e-2, bn="site")
    a.adapt_and_predict(image)
    saved = {k: v for k, v in a.state_dict().items()}
    b = build_adapter("grata", tiny_model, lr=1e-2, bn="site")
    b.load_state_dict(saved)
    torch.testing.assert_close(a.adapt_and_predict(image), b.adapt_and_predict(image))


def test_a_snapshot_does_not_move_with_the_adapter(tiny_model, image):
    """state_dict clones its tensors (the geometry step's retry snapshot): stepping on after it, which
    updates BN statistics, affine parameters and Adam's moments in place, leaves it as it was."""
    a = build_adapter("grata", tiny_model, lr=1e-2, bn="site")
    a.adapt_and_predict(image)
    snapshot = a.state_dict()
    first = a.adapt_and_predict(image)
    for _ in range(2):
        a.adapt_and_predict(torch.rand(1, 3, 16, 16))
    a.load_state_dict(snapshot)
    torch.testing.assert_close(a.adapt_and_predict(image), first)


def test_anchor_pulls_towards_the_source(tiny_model, image):
    free = build_adapter("grata", tiny_model, lr=1e-2, pse="ent")
    held = build_adapter("grata", tiny_model, lr=1e-2, pse="ent", anchor=0.5)
    for _ in range(3):
        free.adapt_and_predict(image)
        held.adapt_and_predict(image)
    dist = lambda a: sum((p - q).abs().sum().item() for p, q in zip(a.params, a._source_params))  # noqa: E731
    assert 0 < dist(held) < dist(free)


def test_sar_skips_unreliable_images(tiny_model, image):
    adapter = build_adapter("sar", tiny_model, margin=0.0)  # nothing is reliable
    before = [p.detach().clone() for p in adapter.params]
    adapter.adapt_and_predict(image)
    assert adapter.last_step["reliable"] == 0.0
    assert all(torch.equal(p, q) for p, q in zip(adapter.params, before))


@pytest.mark.parametrize("kwargs,match", [
    (dict(aux="rotation"), "aux"), (dict(pse="x"), "pse"), (dict(entropy_form="shannon"), "entropy_form"),
    (dict(bn="batch"), "bn policy"), (dict(lr=-1.0), "lr"), (dict(momentum=0.9), "momentum"),
])
def test_bad_options_are_clear_errors(tiny_model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_adapter("grata", tiny_model, **kwargs)


def test_unknown_adapter(tiny_model):
    with pytest.raises(ValueError, match="choose one of"):
        build_adapter("cotta", tiny_model)


def test_batched_views_give_the_same_step(tiny_model, image):
    a = build_adapter("grata", tiny_model, lr=1e-2, bn="image", speed={"preset": "faithful", "batch_views": "off"})
    b = build_adapter("grata", tiny_model, lr=1e-2, bn="image", speed={"preset": "faithful", "batch_views": "on"})
    torch.testing.assert_close(a.adapt_and_predict(image), b.adapt_and_predict(image), rtol=1e-4, atol=1e-5)
    assert a.last_step["cosine"] == pytest.approx(b.last_step["cosine"], abs=1e-5)


def test_guard_resets_parameters_when_the_proxy_falls(tiny_model, image):
    adapter = build_adapter("grata", tiny_model, lr=1e-2, bn="site", guard=5.0, guard_warmup=2)
    for proxy in (80.0, 80.0, 79.0):  # small wobble: no reset
        assert not adapter._check_drift(proxy)
    adapter.adapt_and_predict(image)  # parameters move away from the source
    site_before = adapter.norms[0].site_count.clone()
    moved = [p.detach().clone() for p in adapter.params]
    assert any(not torch.equal(a, b) for a, b in zip(moved, adapter._source_params))
    fired = [adapter._check_drift(p) for p in (40.0, 40.0, 40.0)]  # a sharp fall
    assert any(fired) and adapter.guard_resets == 1
    assert all(torch.equal(a.detach(), b) for a, b in zip(adapter.params, adapter._source_params))
    assert torch.equal(adapter.norms[0].site_count, site_before)  # the site's statistics are kept
    adapter.reset()
    assert adapter.guard_resets == 0
    assert adapter.describe()["guard"] == 5.0 and adapter.describe()["guard_warmup"] == 2


def test_ensemble_prediction_is_the_weak_view_mean(tiny_model, image):
    adapter = build_adapter("source", tiny_model, ensemble=True, speed="faithful")
    ref = tiny_model.eval()
    with torch.no_grad():
        outs = [ref(image), ref(image.flip(3)).flip(3), ref(image.flip(2)).flip(2)]
        outs += [torch.rot90(ref(torch.rot90(image, k, (2, 3))), -k, (2, 3)) for k in (1, 2, 3)]
        want = torch.stack([torch.sigmoid(o) for o in outs]).mean(0)
    got = torch.sigmoid(adapter.adapt_and_predict(image))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    plain = build_adapter("source", tiny_model)
    assert not torch.allclose(plain.adapt_and_predict(image), adapter.adapt_and_predict(image))


def test_auto_policy_keeps_source_statistics_for_a_small_shift_and_switches_for_a_large_one(tiny_model):
    import copy

    from grata.adapters.base import shift_reference

    g = torch.Generator().manual_seed(0)
    source_like = [torch.rand(1, 3, 16, 16, generator=g) for _ in range(6)]
    tiny_model = copy.deepcopy(tiny_model)  # a source model whose running statistics describe its source images
    for m in tiny_model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        tiny_model.train()(torch.cat(source_like))
    tiny_model.eval()
    ref = shift_reference(tiny_model, torch.cat(source_like))
    assert ref > 0
    with pytest.raises(ValueError, match="shift_reference"):
        build_adapter("bn", tiny_model, bn="auto")

    calm = build_adapter("bn", tiny_model, bn="auto", shift_reference=ref, auto_warmup=2)
    for x in source_like:
        calm.adapt_and_predict(x)
    assert calm.last_step["bn_image"] == 0.0 and calm.last_step["shift_ratio"] < 10
    plain_source = build_adapter("source", tiny_model)
    torch.testing.assert_close(calm.adapt_and_predict(source_like[0]), plain_source.adapt_and_predict(source_like[0]))

    shifted = build_adapter("bn", tiny_model, bn="auto", shift_reference=ref, auto_warmup=2)
    far = [x * 8 + 3 for x in source_like]  # a drastic acquisition change
    for x in far[:2]:
        shifted.adapt_and_predict(x)
    assert shifted.last_step["bn_image"] == 1.0 and shifted.last_step["shift_ratio"] > 10
    per_image = build_adapter("bn", tiny_model, bn="image")
    torch.testing.assert_close(shifted.adapt_and_predict(far[2]), per_image.adapt_and_predict(far[2]))

    saved = shifted.state_dict()  # the decision survives a new process
    again = build_adapter("bn", tiny_model, bn="auto", shift_reference=ref)
    again.load_state_dict(saved)
    assert again.auto_switched and all(layer.policy.image == 1.0 for layer in again.norms)
    assert shifted.describe()["bn_policy"]["image"] == 1.0
    shifted.reset()
    assert not shifted.auto_switched and all(layer.policy == plain_source.policy for layer in shifted.norms)


def test_pooled_statistics_enter_as_one_more_weighted_input(tiny_model, image):
    import copy

    from grata.adapters import build_adapter

    adapter = build_adapter("source", tiny_model, speed="faithful")
    base = adapter.predict(image)
    same = [(n.running_mean.clone(), n.running_var + n.running_mean**2) for n in adapter.norms]
    adapter.set_pooled(same, 0.5)  # pooled == source: nothing changes
    assert torch.allclose(adapter.predict(image), base, atol=1e-5)
    other = [(m1 + 0.3, m2 + 0.5) for m1, m2 in same]
    adapter.set_pooled(other, 1.0)  # pooled only: as if the source statistics were the pooled ones
    swapped = copy.deepcopy(tiny_model)
    for bn, (m1, m2) in zip([m for m in swapped.modules() if isinstance(m, torch.nn.BatchNorm2d)], other):
        bn.running_mean.copy_(m1)
        bn.running_var.copy_(m2 - m1**2)
    assert torch.allclose(adapter.predict(image), swapped(image), atol=1e-4)
    state = adapter.state_dict()
    again = build_adapter("source", tiny_model, speed="faithful")
    again.load_state_dict(state)  # the pooled share and statistics persist with the site
    assert again.pooled_weight == 1.0 and torch.allclose(again.predict(image), swapped(image), atol=1e-4)
    again.reset()
    assert again.pooled_weight == 0.0 and torch.allclose(again.predict(image), base, atol=1e-5)
