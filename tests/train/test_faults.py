"""Fault injection (the `fault:` section) does exactly what it says on a real tiny run, and nothing when off."""

import pytest
import torch

from flowtrain.config import load_config
from flowtrain.errors import ConfigError
from flowtrain.train.step import train_step
from flowtrain.train.trainer import Trainer
from tests.conftest import tiny_overrides


def _trainer(text, tmp_path, **extra):
    return Trainer(load_config("default", tiny_overrides(text, tmp_path, **extra)))


def test_each_fault_acts_at_its_step(small_text, tmp_path):
    tr = _trainer(small_text, tmp_path, **{
        "fault.zero_grad_layer": "block.1", "fault.zero_grad_from": 3,
        "fault.lr_spike_from": 2, "fault.lr_spike_steps": 1, "fault.lr_spike_factor": 1000.0,
        "fault.scale_tensor": "blocks.0.attn.qkv.weight", "fault.scale_step": 4, "fault.scale_factor": 3.0,
    })  # fmt: skip
    params = dict(tr.raw_model.named_parameters())
    block1 = [p for n, p in params.items() if n.startswith("blocks.1.")]
    seen_lr = []
    tr.state.optimizer.register_step_pre_hook(lambda opt, *_: seen_lr.append(opt.param_groups[0]["lr"]))
    grads = []
    for p in block1:
        p.register_post_accumulate_grad_hook(lambda p: grads.append((tr.step + 1, float(p.grad.abs().sum()))))
    for _ in range(3):
        train_step(tr.state)
    assert all((g > 0) == (step < 3) for step, g in grads)  # block.1's gradients are zero from step 3 on
    scheduled = [g["lr"] for g in tr.state.optimizer.param_groups]
    assert seen_lr[1] > 100 * seen_lr[0] and seen_lr[2] < 100 * seen_lr[0]  # only step 2 ran at x1000
    assert scheduled[0] == tr.state.scheduler.get_last_lr()[0]  # and the schedule itself is untouched
    qkv = params["blocks.0.attn.qkv.weight"]
    before = qkv.detach().clone()
    train_step(tr.state)  # step 4: its update, then x3
    after_update = qkv.detach() / 3.0
    assert torch.allclose(after_update, before, rtol=0.2, atol=1e-2) and not torch.allclose(qkv.detach(), before)


def test_faults_off_change_nothing(small_text, tmp_path):
    a = _trainer(small_text, tmp_path, **{"train.run_name": "a"})
    b = _trainer(small_text, tmp_path, **{"train.run_name": "b", "fault.nan_grad_tensor": "blocks.0.mlp.fc.weight"})
    for _ in range(3):  # a tensor named but no step: off
        train_step(a.state)
        train_step(b.state)
    assert all(torch.equal(x, y) for x, y in zip(a.raw_model.parameters(), b.raw_model.parameters(), strict=True))


def test_a_wrong_name_is_a_one_line_config_error(small_text, tmp_path):
    with pytest.raises(ConfigError, match="no parameter named 'blocks.9.nope'"):
        _trainer(small_text, tmp_path, **{"fault.scale_tensor": "blocks.9.nope", "fault.scale_step": 2})
    with pytest.raises(ConfigError, match="no parameter in layer 'block.7'"):
        _trainer(small_text, tmp_path, **{"fault.zero_grad_layer": "block.7"})
