"""Per-tensor and per-layer statistics vs independent recomputation (float64 references, 1e-6 relative)."""

import math

import numpy as np
import pytest
import torch
from tiny_models import TinyTransformer
from torch import nn
from torch.nn import functional as F

from flowtrain.flow import FlowConfig, FlowMonitor, diagnose
from flowtrain.optim.clipping import GradClipper
from flowtrain.optim.config import ClipConfig

REL = 1e-6


def close(actual, expected, rel=REL):
    assert actual == pytest.approx(expected, rel=rel, abs=1e-12), (actual, expected)


def norm(t):
    return float(torch.linalg.vector_norm(t.double()))


def loss_of(model, idx):
    return F.cross_entropy(model(idx).flatten(0, 1), idx.roll(-1, 1).flatten())


def one_step(seed=0, max_norm=0.05, poison=None, optimizer=torch.optim.AdamW, device="cpu", **opt_kwargs):
    torch.manual_seed(seed)
    model = TinyTransformer()
    model.unused = nn.Linear(2, 2)  # a parameter that never gets a gradient
    model.to(device)
    opt = optimizer(model.parameters(), lr=3e-3, weight_decay=0.1, **opt_kwargs)
    clipper = GradClipper(ClipConfig(kind="norm", max_norm=max_norm))
    monitor = FlowMonitor(model, opt, FlowConfig())
    params = [p for p in model.parameters() if p.requires_grad]
    idx = torch.randint(0, 17, (4, 8)).to(device)
    records = []
    for step in range(2):  # step 1 has Adam state from step 0
        opt.zero_grad(set_to_none=True)
        loss_of(model, idx).backward()
        if poison is not None and step == 1:
            dict(model.named_parameters())[poison].grad[0, 0] = float("nan")
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        monitor.after_backward()
        clip = clipper(params)
        opt.step()
        monitor.after_step(clip_stats=clip)
        records.append(monitor.collect(step))
    return model, opt, monitor, grads, weights, clip, records


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_per_tensor_statistics_match_manual_recomputation(fused):
    """ΔW is measured from the monitor's copy of the weights, whichever AdamW step torch takes."""
    model, opt, monitor, grads, weights, clip, records = one_step(fused=fused)
    rec = records[-1]
    assert rec.step == 1
    for name, p in model.named_parameters():
        s = rec.tensor(name)
        w_old = weights[name]
        if name in grads:
            g = grads[name]
            close(s["grad_norm"], norm(g))
            close(s["grad_max_abs"], float(g.abs().max()))
            close(s["grad_rms"], math.sqrt(float((g.double() ** 2).mean())))
            assert s["grad_nonfinite"] == 0
            v = opt.state[p]["exp_avg_sq"]
            close(s["adam_v_rms"], math.sqrt(float(v.double().mean())))
        else:
            assert name.startswith("unused")
            assert math.isnan(s["grad_norm"]) and math.isnan(s["adam_v_rms"])
        close(s["weight_norm"], norm(w_old))
        close(s["update_norm"], norm(p.detach() - w_old))
        close(s["update_ratio"], norm(p.detach() - w_old) / norm(w_old))


def test_global_scalars_and_clip_stats_are_passed_through():
    model, opt, monitor, grads, weights, clip, records = one_step()
    sc = records[-1].scalars
    assert sc["grad_norm_preclip"] == float(clip.grad_norm_preclip)  # reported, not recomputed
    assert sc["grad_norm_postclip"] == float(clip.grad_norm_postclip)
    assert sc["clip_coef"] == float(clip.clip_coef)
    assert sc["clipped"] == 1.0 and sc["clip_rate"] == 1.0
    close(sc["grad_norm_preclip"], math.sqrt(sum(norm(g) ** 2 for g in grads.values())), rel=1e-5)
    new = dict(model.named_parameters())
    close(sc["update_norm"], math.sqrt(sum(norm(new[n].detach() - w) ** 2 for n, w in weights.items())))
    close(sc["param_norm"], math.sqrt(sum(norm(w) ** 2 for w in weights.values())))
    assert sc["grad_nonfinite"] == 0


def test_per_layer_aggregates_match_manual_grouping():
    model, opt, monitor, grads, weights, clip, records = one_step()
    rec = records[-1]
    assert rec.layer_names == ["tok_emb", "pos_emb", "blocks.0", "blocks.1", "blocks.2", "norm_f", "lm_head", "unused"]
    for layer in ["blocks.1", "tok_emb"]:
        names = [n for n in grads if n.split(".")[0] == layer or n.startswith(layer + ".")]
        s = rec.layer(layer)
        close(s["grad_norm"], math.sqrt(sum(norm(grads[n]) ** 2 for n in names)))
        close(s["grad_max_abs"], max(float(grads[n].abs().max()) for n in names))
        numel = sum(grads[n].numel() for n in names)
        close(s["grad_rms"], math.sqrt(sum(norm(grads[n]) ** 2 for n in names) / numel))
        new = dict(model.named_parameters())
        upd = math.sqrt(sum(norm(new[n].detach() - weights[n]) ** 2 for n in names))
        close(s["update_ratio"], upd / math.sqrt(sum(norm(weights[n]) ** 2 for n in names)))
        v = [opt.state[new[n]]["exp_avg_sq"].double() for n in names]
        close(s["adam_v_rms"], math.sqrt(float(sum(x.sum() for x in v)) / numel))
    unused = rec.layer("unused")
    assert math.isnan(unused["grad_norm"]) and unused["weight_norm"] > 0


def test_nonfinite_gradient_is_counted_and_named():
    *_, records = one_step(poison="blocks.1.mlp.0.weight")
    rec = records[-1]
    assert rec.tensor("blocks.1.mlp.0.weight")["grad_nonfinite"] == 1
    assert rec.scalars["grad_nonfinite"] == 1
    assert not math.isfinite(rec.layer("blocks.1")["grad_norm"])
    d = diagnose(records)
    assert d.verdict == "nonfinite" and "blocks.1.mlp.0.weight" in d.cause


def test_interval_skips_per_tensor_stats_and_hooks_between_monitored_steps():
    torch.manual_seed(0)
    model = TinyTransformer()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = FlowMonitor(model, opt, FlowConfig(interval=3))
    idx = torch.randint(0, 17, (2, 8))
    got, hooked = [], []
    for step in range(4):
        hooked.append(any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()))
        opt.zero_grad()
        loss_of(model, idx).backward()
        monitor.after_backward()
        opt.step()
        monitor.after_step()
        rec = monitor.collect(step)
        got.append((rec.tensor_stats is not None, rec.depth_stats is not None, "update_norm" in rec.scalars))
    # between monitored steps nothing is measured (not even the update norm, which needs a weight copy), and the
    # model runs without hooks
    assert got == [(True, True, True), (False, False, False), (False, False, False), (True, True, True)]
    assert hooked == [True, False, False, True]
    monitor.remove()
    monitor.restart_at(6)  # arms step 6 (monitored), but removed hooks stay removed
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    # SGD keeps no second moment
    assert np.isnan(rec.tensor_stats[:, -1]).all()


def test_disabled_monitor_attaches_nothing():
    model = TinyTransformer()
    monitor = FlowMonitor(model, None, FlowConfig(enabled=False))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    monitor.after_backward()
    monitor.after_step()
    assert monitor.collect(0) is None


def test_weights_changed_between_steps_are_not_counted_as_the_update():
    """A change to the weights between steps (in place, or through .data) is not part of the next step's ΔW:
    the copy is taken after the backward pass of every monitored step."""
    torch.manual_seed(0)
    model = TinyTransformer()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    monitor = FlowMonitor(model, opt, FlowConfig(interval=1))
    idx = torch.randint(0, 17, (4, 8))
    edits = {1: "in_place", 2: "data"}
    for step in range(4):
        if edits.get(step) == "in_place":
            with torch.no_grad():
                model.tok_emb.weight.mul_(0.5)
        elif edits.get(step) == "data":
            model.lm_head.weight.data.mul_(2.0)
        opt.zero_grad(set_to_none=True)
        loss_of(model, idx).backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        monitor.after_backward()
        opt.step()
        monitor.after_step()
        rec = monitor.collect(step)
        for name, p in model.named_parameters():
            close(rec.tensor(name)["weight_norm"], norm(before[name]))
            close(rec.tensor(name)["update_norm"], norm(p.detach() - before[name]))


def test_a_skipped_step_reports_no_update_and_the_weights():
    """The guard skips a step through found_inf (as the trainer does for fused optimizers): torch's fused AdamW
    takes no step, and the record says ΔW = 0 with the weights' true norms."""
    torch.manual_seed(0)
    model = TinyTransformer()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, fused=True)
    monitor = FlowMonitor(model, opt, FlowConfig())
    idx = torch.randint(0, 17, (4, 8))
    for step in range(2):
        opt.zero_grad(set_to_none=True)
        loss_of(model, idx).backward()
        monitor.after_backward()
        if step == 1:
            opt.found_inf = torch.ones(())
        opt.step()
        monitor.after_step()
        rec = monitor.collect(step)
    for name, p in model.named_parameters():
        s = rec.tensor(name)
        assert s["update_norm"] == 0.0
        close(s["weight_norm"], norm(p.detach()))
        close(s["adam_v_rms"], math.sqrt(float(opt.state[p]["exp_avg_sq"].double().mean())))


def test_a_poisoned_tensor_is_reported_as_non_finite_not_as_still():
    """A NaN gradient let through (no guard) makes the weights NaN; on the next step the tensor still stepped:
    its ΔW is NaN, not "did not move"."""
    torch.manual_seed(0)
    model = TinyTransformer()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    monitor = FlowMonitor(model, opt, FlowConfig())
    idx = torch.randint(0, 17, (4, 8))
    name = "blocks.1.mlp.0.weight"
    for step in range(2):
        opt.zero_grad(set_to_none=True)
        loss_of(model, idx).backward()
        if step == 0:
            dict(model.named_parameters())[name].grad[0, 0] = float("nan")
        monitor.after_backward()
        opt.step()
        monitor.after_step()
        rec = monitor.collect(step)
    s = rec.tensor(name)
    assert math.isnan(s["weight_norm"]) and math.isnan(s["update_norm"])


def test_figures_describe_the_gradients_as_after_backward_finds_them():
    """Two micro-batches, then one gradient changed in place and one replaced before after_backward(): every
    figure is that of the gradients then; steps between monitored ones (interval 2) change nothing."""
    torch.manual_seed(0)
    model = TinyTransformer()
    monitor = FlowMonitor(model, None, FlowConfig(interval=2))
    idx = torch.randint(0, 17, (4, 8))
    named = dict(model.named_parameters())
    for step in range(5):
        model.zero_grad(set_to_none=True)
        for part in (idx[:2], idx[2:]):
            (loss_of(model, part) / 2).backward()
        if step == 2:
            named["blocks.0.mlp.0.weight"].grad.mul_(3.0)  # in place
            named["lm_head.weight"].grad = named["lm_head.weight"].grad * -2.0  # another tensor
        monitor.after_backward()
        monitor.after_step()
        rec = monitor.collect(step)
        if step % 2:
            assert rec.tensor_stats is None
            continue
        stats = dict(zip(rec.tensor_names, rec.tensor_stats.tolist(), strict=True))
        for name, p in named.items():
            close(stats[name][0], norm(p.grad))  # grad_norm
            close(stats[name][1], float(p.grad.abs().max()))  # grad_max_abs
    monitor.remove()
