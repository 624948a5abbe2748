"""Optimizer construction: parameter kinds, decay groups, implementations, and the decay each group gets."""

from __future__ import annotations

import io
import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from flowtrain.errors import ConfigError
from flowtrain.optim.config import OptimConfig
from flowtrain.optim.optimizers import build_optimizer, param_kind


class ScaleNorm(nn.Module):
    """A hand-written norm: classified as a norm by its class name."""

    def __init__(self, dim: int):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.gain * x / x.norm(dim=-1, keepdim=True)


class Toy(nn.Module):
    """Every kind of parameter, a tied head registered before the embedding, and a frozen tensor."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 11, bias=False)
        self.emb = nn.Embedding(11, 8)
        self.head.weight = self.emb.weight  # tied: first named "head.weight", still an embedding
        self.proj = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)
        self.rms = nn.RMSNorm(8)
        self.gn = nn.GroupNorm(2, 8)
        self.scale = ScaleNorm(8)
        self.gate = nn.Parameter(torch.full((8,), 0.5))  # 1-D but not a bias: a weight
        self.frozen = nn.Parameter(torch.ones(3), requires_grad=False)


EXPECTED_KIND = {  # in named_parameters order: a module's own parameters before its children's
    "gate": "weight",
    "head.weight": "embedding",
    "proj.weight": "weight",
    "proj.bias": "bias",
    "ln.weight": "norm",
    "ln.bias": "norm",
    "rms.weight": "norm",
    "gn.weight": "norm",
    "gn.bias": "norm",
    "scale.gain": "norm",
}


def test_param_kind_of_each_parameter():
    model = Toy()
    assert param_kind(model, "emb.weight", model.emb.weight) == "embedding"
    assert param_kind(model, "head.weight", model.head.weight) == "weight"  # by its own name alone
    for name, kind in EXPECTED_KIND.items():
        if name != "head.weight":
            assert param_kind(model, name, model.get_parameter(name)) == kind, name


def test_groups_cover_every_trainable_parameter_once_in_model_order():
    model = Toy()
    opt = build_optimizer(model, OptimConfig(), "cpu")
    decay, keep = opt.param_groups
    assert (decay["name"], keep["name"]) == ("decay", "no_decay")
    assert decay["names"] == ["gate", "proj.weight"]
    assert keep["names"] == [n for n in EXPECTED_KIND if n not in ("proj.weight", "gate")]
    assert decay["weight_decay"] == 0.1 and keep["weight_decay"] == 0.0
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(EXPECTED_KIND)  # tied once, frozen left out
    for g in opt.param_groups:
        assert [id(p) for p in g["params"]] == [id(model.get_parameter(n)) for n in g["names"]]


def test_no_decay_is_configurable():
    opt = build_optimizer(Toy(), OptimConfig(no_decay=["bias"]), "cpu")
    assert opt.param_groups[1]["names"] == ["proj.bias"]
    opt = build_optimizer(Toy(), OptimConfig(no_decay=[]), "cpu")
    assert opt.param_groups[1]["names"] == [] and len(opt.param_groups[0]["names"]) == len(EXPECTED_KIND)


@pytest.mark.parametrize("implementation", ["auto", "foreach", "loop", "fused"])
def test_adamw_decays_only_the_decay_group(implementation):
    """Zero gradients: Adam's update is 0/(0+eps) = 0, so only decoupled decay moves the weights."""
    model = Toy()
    lr, wd = 0.1, 0.5
    opt = build_optimizer(model, OptimConfig(lr=lr, weight_decay=wd, implementation=implementation), "cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in model.named_parameters():
        if name in ("proj.weight", "gate"):
            torch.testing.assert_close(p, before[name] * (1 - lr * wd), rtol=1e-6, atol=0)
        else:
            assert torch.equal(p, before[name]), name


def test_auto_picks_fused_on_cpu_and_foreach_without_a_kernel():
    assert build_optimizer(Toy(), OptimConfig(), "cpu").defaults["fused"] is True
    rms = build_optimizer(Toy(), OptimConfig(name="rmsprop"), "cpu")
    assert rms.defaults["foreach"] is True
    assert build_optimizer(Toy(), OptimConfig(implementation="loop"), "cpu").defaults["foreach"] is False


def test_adamw_step_matches_hand_written_update():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    cfg = OptimConfig(lr=0.01, betas=(0.8, 0.9), eps=1e-8, weight_decay=0.2)
    opt = build_optimizer(model, cfg, "cpu")
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    gw, gb = torch.randn(3, 4), torch.randn(3)
    model.weight.grad, model.bias.grad = gw.clone(), gb.clone()
    opt.step()

    def adam(p, g, wd):  # one step from zero moments, bias-corrected
        m, v = (1 - 0.8) * g, (1 - 0.9) * g * g
        m_hat, v_hat = m / (1 - 0.8), v / (1 - 0.9)
        return p * (1 - 0.01 * wd) - 0.01 * m_hat / (v_hat.sqrt() + 1e-8)

    torch.testing.assert_close(model.weight.detach(), adam(w0, gw, 0.2), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(model.bias.detach(), adam(b0, gb, 0.0), rtol=1e-6, atol=1e-7)


def test_adam_has_one_group_and_no_decay():
    model = Toy()
    opt = build_optimizer(model, OptimConfig(name="adam", weight_decay=0.3), "cpu")
    assert isinstance(opt, torch.optim.Adam) and not isinstance(opt, torch.optim.AdamW)
    (group,) = opt.param_groups
    assert group["name"] == "all" and group["weight_decay"] == 0.0 and len(group["names"]) == len(EXPECTED_KIND)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_nesterov_and_l2_in_decay_group_only(nesterov):
    model = nn.Linear(3, 2)
    lr, wd, mom = 0.1, 0.5, 0.9
    cfg = OptimConfig(name="sgd", lr=lr, weight_decay=wd, momentum=mom, nesterov=nesterov)
    opt = build_optimizer(model, cfg, "cpu")
    assert opt.defaults["momentum"] == mom and opt.defaults["nesterov"] is nesterov
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    g = torch.ones(2, 3)
    buf = None
    for _ in range(2):  # hand-written SGD with L2, momentum and optional Nesterov
        model.weight.grad, model.bias.grad = g.clone(), torch.zeros(2)
        opt.step()
        d = g + wd * w
        buf = d if buf is None else mom * buf + d
        w = w - lr * (d + mom * buf if nesterov else buf)
    torch.testing.assert_close(model.weight.detach(), w, rtol=1e-6, atol=1e-7)
    assert torch.equal(model.bias.detach(), b)


def test_rmsprop_l2_in_decay_group_only():
    model = nn.Linear(3, 2)
    opt = build_optimizer(model, OptimConfig(name="rmsprop", lr=0.01, weight_decay=0.5, momentum=0.0), "cpu")
    assert isinstance(opt, torch.optim.RMSprop)
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    model.weight.grad, model.bias.grad = torch.zeros(2, 3), torch.zeros(2)
    opt.step()
    d = 0.5 * w  # the L2 gradient
    expect = w - 0.01 * d / ((1 - 0.99) * d * d).sqrt().add(1e-8)
    torch.testing.assert_close(model.weight.detach(), expect, rtol=1e-6, atol=1e-7)
    assert torch.equal(model.bias.detach(), b)


def test_state_dict_round_trips_through_a_safe_load_into_a_fresh_optimizer():
    """As a checkpoint does: torch.save, then torch.load(weights_only=True) (group names must survive it)."""
    torch.manual_seed(0)
    a, b = Toy(), Toy()
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = build_optimizer(a, OptimConfig(), "cpu"), build_optimizer(b, OptimConfig(), "cpu")
    for p in a.parameters():
        p.grad = torch.randn_like(p)
    opt_a.step()
    buffer = io.BytesIO()
    torch.save(opt_a.state_dict(), buffer)
    buffer.seek(0)
    opt_b.load_state_dict(torch.load(buffer, weights_only=True))
    b.load_state_dict(a.state_dict())
    assert opt_b.param_groups[0]["names"] == opt_a.param_groups[0]["names"]
    for m, opt in ((a, opt_a), (b, opt_b)):
        torch.manual_seed(1)
        for p in m.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="nesterov"):
        build_optimizer(Toy(), OptimConfig(name="sgd", momentum=0.0, nesterov=True), "cpu")
    with pytest.raises(ConfigError, match="fused"):
        build_optimizer(Toy(), OptimConfig(name="rmsprop", implementation="fused"), "cpu")
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        build_optimizer(frozen, OptimConfig(), "cpu")
    with pytest.raises(ValidationError, match="unknown parameter kind"):
        OptimConfig(no_decay=["biases"])


def test_lr_is_the_peak_lr_in_every_group():
    opt = build_optimizer(Toy(), OptimConfig(lr=3e-4), "cpu")
    assert all(math.isclose(g["lr"], 3e-4) for g in opt.param_groups)
