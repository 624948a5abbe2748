"""Gradient clipping: every kind against a hand-written reference, the reported statistics, non-finite grads."""

from __future__ import annotations

import inspect
import json
import math
import re

import pytest
import torch
from torch import nn

from flowtrain.optim import clipping
from flowtrain.optim.clipping import GradClipper
from flowtrain.optim.config import ClipConfig


def model_with_grads(scale: float = 1.0, seed: int = 0) -> nn.Module:
    """Embedding, Linear with bias, LayerNorm, a conv: 2-D, 4-D, 1-D and zero-initialised parameters."""
    torch.manual_seed(seed)
    model = nn.ModuleDict(
        {"emb": nn.Embedding(13, 6), "fc": nn.Linear(6, 5), "ln": nn.LayerNorm(5), "conv": nn.Conv2d(2, 3, 2)}
    )
    nn.init.zeros_(model["fc"].bias)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * scale
    return model


def grads_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def full_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.cat([t.flatten() for t in tensors]))


def assert_scalar_tensors(stats):
    for t in (stats.grad_norm_preclip, stats.grad_norm_postclip, stats.clip_coef, stats.clipped):
        assert isinstance(t, torch.Tensor) and t.ndim == 0
    assert stats.clipped.dtype == torch.bool


@pytest.mark.parametrize("kind", ["norm", "value", "off", "per_tensor", "agc", "zclip"])
def test_preclip_norm_equals_vector_norm_of_all_gradients(kind):
    model = model_with_grads(3.0)
    before = grads_of(model)
    stats = GradClipper(ClipConfig(kind=kind))(model.parameters())
    assert_scalar_tensors(stats)
    torch.testing.assert_close(stats.grad_norm_preclip, full_norm(before), rtol=1e-5, atol=0)
    torch.testing.assert_close(stats.grad_norm_postclip, full_norm(grads_of(model)), rtol=1e-5, atol=0)
    torch.testing.assert_close(stats.tensor_norm_preclip, torch.stack([g.norm() for g in before]), rtol=1e-5, atol=0)
    torch.testing.assert_close(
        stats.tensor_norm_postclip, torch.stack([g.norm() for g in grads_of(model)]), rtol=1e-5, atol=1e-7
    )
    torch.testing.assert_close(stats.clip_coef, stats.grad_norm_postclip / stats.grad_norm_preclip, rtol=1e-5, atol=0)


def test_norm_clips_to_max_norm_scaling_every_gradient_by_exactly_coef():
    model = model_with_grads(3.0)
    before = grads_of(model)
    stats = GradClipper(ClipConfig(kind="norm", max_norm=0.5))(model.parameters())
    after = grads_of(model)
    assert bool(stats.clipped)
    assert full_norm(after).item() <= 0.5 * (1 + 1e-6)
    coef = 0.5 / (full_norm(before) + 1e-6)
    torch.testing.assert_close(stats.clip_coef, coef, rtol=1e-6, atol=0)
    for b, a in zip(before, after, strict=True):
        assert torch.equal(a, b * stats.clip_coef)  # one multiply per element, nothing else
    # and the same as torch's own clip_grad_norm_
    twin = model_with_grads(3.0)
    total = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5, foreach=True)
    torch.testing.assert_close(stats.grad_norm_preclip, total, rtol=1e-6, atol=0)
    for a, t in zip(after, grads_of(twin), strict=True):
        torch.testing.assert_close(a, t, rtol=1e-6, atol=1e-9)


def test_norm_below_max_leaves_gradients_alone():
    model = model_with_grads(1e-3)
    before = grads_of(model)
    stats = GradClipper(ClipConfig(kind="norm", max_norm=1.0))(model.parameters())
    assert not bool(stats.clipped) and stats.clip_coef.item() == 1.0
    assert all(torch.equal(a, b) for a, b in zip(grads_of(model), before, strict=True))
    assert stats.grad_norm_postclip.item() == stats.grad_norm_preclip.item()


def test_norm_clipping_of_bfloat16_gradients():
    p = nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    p.grad = torch.full((64,), 2.0, dtype=torch.bfloat16)
    stats = GradClipper(ClipConfig(kind="norm", max_norm=1.0))([p])
    assert stats.grad_norm_preclip.item() == pytest.approx(16.0)
    assert p.grad.dtype == torch.bfloat16
    torch.testing.assert_close(p.grad.float(), torch.full((64,), 2.0 / 16.0), rtol=1e-2, atol=0)


def test_value_clamps_each_element_and_reports_norms():
    model = model_with_grads(3.0)
    before = grads_of(model)
    stats = GradClipper(ClipConfig(kind="value", max_value=0.7))(model.parameters())
    for b, a in zip(before, grads_of(model), strict=True):
        assert torch.equal(a, b.clamp(-0.7, 0.7))
    assert bool(stats.clipped) and stats.clip_coef.item() < 1
    small = model_with_grads(1e-3)
    stats = GradClipper(ClipConfig(kind="value", max_value=0.7))(small.parameters())
    assert not bool(stats.clipped) and stats.clip_coef.item() == 1.0


def test_off_changes_nothing_and_still_reports():
    model = model_with_grads(3.0)
    before = grads_of(model)
    stats = GradClipper(ClipConfig(kind="off"))(model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(grads_of(model), before, strict=True))
    assert stats.grad_norm_preclip.item() > 1 and stats.clip_coef.item() == 1.0 and not bool(stats.clipped)
    assert stats.grad_norm_postclip.item() == stats.grad_norm_preclip.item()


def test_per_tensor_matches_reference_loop():
    model = model_with_grads(0.5)
    model["fc"].weight.grad *= 40  # only some tensors over the limit
    before = grads_of(model)
    stats = GradClipper(ClipConfig(kind="per_tensor", max_norm=2.0))(model.parameters())
    expect, clipped = [], []
    for g in before:
        n = math.sqrt(sum(float(x) ** 2 for x in g.flatten()))
        c = min(1.0, 2.0 / (n + 1e-6))
        expect.append(g * c)
        clipped.append(float(c < 1))
    for e, a in zip(expect, grads_of(model), strict=True):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-9)
        assert a.norm().item() <= 2.0 * (1 + 1e-6)
    assert stats.tensor_clipped_fraction.tolist() == clipped and 0 < sum(clipped) < len(clipped)
    assert bool(stats.clipped)


def agc_reference(weight: torch.Tensor, grad: torch.Tensor, lam: float, eps: float) -> tuple[torch.Tensor, float]:
    """AGC unit by unit in plain Python floats: rows along dim 0; elements for 1-D tensors."""
    w = weight.detach().double().reshape(weight.shape[0], -1) if weight.ndim >= 2 else weight.detach().double()[:, None]
    g = grad.double().reshape(w.shape).clone()
    n_clipped = 0
    for i in range(w.shape[0]):
        w_norm = math.sqrt(sum(float(x) ** 2 for x in w[i]))
        g_norm = math.sqrt(sum(float(x) ** 2 for x in g[i]))
        cap = lam * max(w_norm, eps)
        if g_norm > cap:
            g[i] *= cap / g_norm
            n_clipped += 1
    return g.reshape(grad.shape).float(), n_clipped / w.shape[0]


def test_agc_matches_reference_loop_for_every_parameter_shape():
    model = model_with_grads(0.05)
    before = grads_of(model)
    lam, eps = 0.05, 1e-3
    stats = GradClipper(ClipConfig(kind="agc", agc_lambda=lam, agc_eps=eps))(model.named_parameters())
    names = [n for n, _ in model.named_parameters()]
    assert stats.names == names
    fractions = []
    for (name, p), g in zip(model.named_parameters(), before, strict=True):
        expect, fraction = agc_reference(p, g, lam, eps)
        torch.testing.assert_close(p.grad, expect, rtol=1e-5, atol=1e-10, msg=name)
        fractions.append(fraction)
    torch.testing.assert_close(stats.tensor_clipped_fraction, torch.tensor(fractions), rtol=1e-6, atol=0)
    assert 0 < sum(fractions) < len(fractions)  # a mix: some units clipped, others not
    assert fractions[names.index("fc.bias")] == 1.0  # zero bias: every element capped at lam * eps


def zclip_reference(norms: list[float], alpha: float, z: float, warmup: int) -> list[float]:
    """ZClip on a stream of grad norms, in float64: the norm after clipping at each step."""
    out, seen, mean, var = [], [], 0.0, 0.0
    for n in norms:
        if not math.isfinite(n):
            out.append(n)
            continue
        if len(seen) < warmup:
            out.append(n)
            seen.append(n)
            mean = sum(seen) / len(seen)
            var = sum((x - mean) ** 2 for x in seen) / len(seen)
            continue
        sd = math.sqrt(var)
        if (n - mean) / (sd + 1e-6) > z:
            n = mean + z * sd
        out.append(n)
        delta = n - mean
        mean += (1 - alpha) * delta
        var = alpha * (var + (1 - alpha) * delta * delta)
    return out


def norm_stream(length: int, seed: int = 0) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    norms = (1.0 + 0.1 * torch.randn(length, generator=gen, dtype=torch.float64)).tolist()
    for i in (12, 30, 31, 45):
        norms[i] *= 8  # spikes
    norms[20] = math.nan
    norms[38] = math.inf
    return norms


def feed(clipper: GradClipper, norms: list[float]) -> list[float]:
    """Give the clipper gradients with exactly these global norms; return the norms it leaves."""
    p = nn.Parameter(torch.zeros(4))
    out = []
    for n in norms:
        p.grad = torch.tensor([n, 0.0, 0.0, 0.0]) if math.isfinite(n) else torch.tensor([n, 1.0, 0.0, 0.0])
        stats = clipper([p])
        out.append(stats.grad_norm_postclip.item())
        if math.isfinite(n):
            assert p.grad[0].item() == pytest.approx(out[-1], rel=1e-6)
    return out


def test_zclip_matches_reference_on_a_stream_with_spikes_and_non_finite_norms():
    cfg = ClipConfig(kind="zclip", zclip_alpha=0.9, zclip_z=2.5, zclip_warmup=10)
    norms = norm_stream(60)
    got = feed(GradClipper(cfg), norms)
    expect = zclip_reference(norms, 0.9, 2.5, 10)
    assert got == pytest.approx(expect, rel=1e-5, nan_ok=True)
    spikes = [i for i in (12, 30, 31, 45) if expect[i] < norms[i]]
    assert spikes == [12, 30, 31, 45]  # every spike clipped, warm-up (0-9) never
    assert got[:10] == pytest.approx(norms[:10], rel=1e-6)


def test_zclip_state_survives_json_and_continues_bit_for_bit():
    cfg = ClipConfig(kind="zclip", zclip_alpha=0.9, zclip_warmup=10)
    norms = norm_stream(60, seed=3)
    whole = feed(GradClipper(cfg), norms)
    first = GradClipper(cfg)
    feed(first, norms[:33])
    state = json.loads(json.dumps(first.state_dict()))
    assert set(state) == {"kind", "count", "mean", "var"} and state["count"] == 10
    second = GradClipper(cfg)
    second.load_state_dict(state)
    assert feed(second, norms[33:]) == whole[33:]
    assert GradClipper(ClipConfig(kind="norm")).state_dict() == {}


@pytest.mark.parametrize("kind", ["norm", "value", "per_tensor", "agc", "zclip", "off"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_gradients_are_reported_and_left_untouched(kind, bad):
    model = model_with_grads(3.0)
    model["fc"].weight.grad[1, 2] = bad
    before = grads_of(model)
    clipper = GradClipper(ClipConfig(kind=kind, zclip_warmup=2))
    stats = clipper(model.parameters())
    assert not math.isfinite(stats.grad_norm_preclip.item())
    assert stats.clip_coef.item() == 1.0 and not bool(stats.clipped)
    for a, b in zip(grads_of(model), before, strict=True):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    if kind == "zclip":
        assert clipper.state_dict()["count"] == 0.0  # statistics skipped the step


def test_parameters_without_gradients_are_skipped_and_empty_input_is_fine():
    model = model_with_grads()
    model["ln"].weight.grad = None
    stats = GradClipper(ClipConfig())(model.named_parameters())
    assert "ln.weight" not in stats.names and len(stats.names) == len(stats.tensor_norm_preclip)
    empty = GradClipper(ClipConfig())([])
    assert empty.grad_norm_preclip.item() == 0.0 and not bool(empty.clipped)


def test_clipping_path_never_asks_the_host_for_a_value():
    """A host read (.item(), float(t), bool(t), .tolist(), .cpu()) would stall the step on a GPU."""
    path = [
        clipping.GradClipper.__call__,
        clipping.GradClipper._by_factor,
        clipping.GradClipper._from_post,
        clipping.GradClipper._value,
        clipping.GradClipper._per_tensor,
        clipping.GradClipper._agc,
        clipping.GradClipper._zclip,
        clipping._scale_,
        clipping._unit_norms,
        clipping._with_grads,
    ]
    host_read = re.compile(r"\.item\(|(?<![.\w])(float|bool|int)\(|\.tolist\(|\.cpu\(|\.numpy\(")
    for fn in path:
        source = inspect.getsource(fn)
        assert not host_read.search(source), f"{fn.__qualname__} reads a value on the host"
    # the one read allowed: skipping the multiply by exactly 1 on the CPU, where reading costs no sync
    assert 'device.type == "cpu" and' in inspect.getsource(clipping._is_one_on_cpu)


def test_unclipped_cpu_step_leaves_gradients_untouched_and_clipped_step_scales_them():
    model = model_with_grads()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    stats = GradClipper(ClipConfig(kind="norm", max_norm=1e9))(model.named_parameters())
    assert float(stats.clip_coef) == 1.0
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, before[n])
    stats = GradClipper(ClipConfig(kind="norm", max_norm=1e-3))(model.named_parameters())
    coef = float(stats.clip_coef)
    assert coef < 1.0
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, before[n] * torch.tensor(coef))
