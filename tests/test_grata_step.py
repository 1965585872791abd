"""GraTa's step against a hand computation that shares no code with the adapter."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from grata.adapters import build_adapter
from grata.augment import strong_style

BETA = 1e-2  # large enough that a wrong step is visible


def bn_params(model):
    return [p for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in (m.weight, m.bias)]


def ref_entropy(logits):
    p = torch.sigmoid(logits)
    return -(p * torch.log(p + 1e-6)).sum(1).mean()


def ref_consistency(model, x, seed):
    with torch.no_grad():  # teacher: original + hflip, vflip, rot90/180/270, mapped back
        outs = [model(x), model(x.flip(3)).flip(3), model(x.flip(2)).flip(2)]
        outs += [torch.rot90(model(torch.rot90(x, k, (2, 3))), -k, (2, 3)) for k in (1, 2, 3)]
        teacher = torch.stack([torch.sigmoid(o) for o in outs]).mean(0)
    student = model(strong_style(x, torch.Generator().manual_seed(seed)))
    return F.binary_cross_entropy_with_logits(student, teacher)


def set_params(params, values):
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)


def hand_steps(model, x, n_steps, pse, dynamic=True):
    """Per-image BN statistics (train-mode BN with batch 1), Adam written out by hand."""
    ref = copy.deepcopy(model).train()
    params = bn_params(ref)
    theta = [p.detach().clone() for p in params]
    m = [torch.zeros_like(t) for t in theta]
    v = [torch.zeros_like(t) for t in theta]
    trace = []
    for t in range(1, n_steps + 1):
        set_params(params, theta)
        g_aux = torch.autograd.grad(ref_entropy(ref(x)), params)
        set_params(params, [a - g for a, g in zip(theta, g_aux)])  # step size exactly 1
        loss = ref_entropy(ref(x)) if pse == "ent" else ref_consistency(ref, x, seed=0)
        g_pse = torch.autograd.grad(loss, params)
        dot = sum((a * b).sum() for a, b in zip(g_pse, g_aux)).item()
        na = math.sqrt(sum((g * g).sum().item() for g in g_aux))
        npse = math.sqrt(sum((g * g).sum().item() for g in g_pse))
        cos = dot / (npse * na + 1e-12)
        lr = BETA * (cos + 1) ** 2 / 4 if dynamic else BETA
        new = []
        for i, g in enumerate(g_pse):
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g * g
            m_hat, v_hat = m[i] / (1 - 0.9**t), v[i] / (1 - 0.999**t)
            new.append(theta[i] - lr * m_hat / (v_hat.sqrt() + 1e-8))
        theta = new
        set_params(params, theta)
        with torch.no_grad():
            trace.append({"cosine": cos, "lr": lr, "logits": ref(x), "theta": [t.clone() for t in theta]})
    return trace


@pytest.mark.parametrize("pse", ["ent", "consis"])
def test_grata_step_matches_hand_computation(tiny_model, image, pse):
    adapter = build_adapter("grata", tiny_model, lr=BETA, aux="ent", pse=pse, bn="image", speed="faithful")
    expected = hand_steps(tiny_model, image, n_steps=2, pse=pse)
    for step, want in enumerate(expected):
        if pse == "consis":
            adapter.generator.manual_seed(0)  # the hand computation draws its strong view from seed 0
        logits = adapter.adapt_and_predict(image)
        assert adapter.last_step["cosine"] == pytest.approx(want["cosine"], abs=1e-5), f"step {step}"
        assert adapter.last_step["lr"] == pytest.approx(want["lr"], rel=1e-4)
        for got, ref in zip(adapter.params, want["theta"]):
            torch.testing.assert_close(got.detach(), ref, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(logits, want["logits"], rtol=1e-4, atol=1e-5)
    moved = sum((p.detach() - q).abs().sum().item() for p, q in zip(adapter.params, bn_params(tiny_model)))
    assert moved > 1e-4  # the test would be empty if nothing had moved


def test_fixed_rate_ablation_uses_beta(tiny_model, image):
    adapter = build_adapter("grata", tiny_model, lr=BETA, aux="ent", pse="ent", dynamic_lr=False)
    want = hand_steps(tiny_model, image, n_steps=1, pse="ent", dynamic=False)[0]
    adapter.adapt_and_predict(image)
    assert adapter.last_step["lr"] == BETA
    for got, ref in zip(adapter.params, want["theta"]):
        torch.testing.assert_close(got.detach(), ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["tent", "grata", "sar"])
def test_only_bn_affine_parameters_change(tiny_model, image, name):
    before_caller = copy.deepcopy(tiny_model.state_dict())
    adapter = build_adapter(name, tiny_model, lr=1e-2, bn="image", **({"margin": 10.0} if name == "sar" else {}))
    start = copy.deepcopy(adapter.model.state_dict())
    for _ in range(3):
        adapter.adapt_and_predict(image)
    end = adapter.model.state_dict()
    norm_names = [n for n, m in adapter.model.named_modules() if m in adapter.norms]
    affine = {f"{n}.{p}" for n in norm_names for p in ("weight", "bias")}
    site = {f"{n}.{b}" for n in norm_names for b in ("site_m1", "site_m2", "site_count")}  # the stream's own estimate
    changed = {k for k in start if not torch.equal(start[k], end[k])}
    assert affine <= changed, "every BN affine parameter should adapt"
    assert changed <= affine | site, changed - affine - site  # source running statistics and weights stay
    for k, v in before_caller.items():  # the caller's model is never touched
        assert torch.equal(tiny_model.state_dict()[k], v)
