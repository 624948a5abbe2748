"""The observing Adam/AdamW: torch's fused CPU step bit for bit, and the update's statistics from the same pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowtrain import kernels
from flowtrain.optim.observed import CHECK_SIZES, ObservedAdam, ObservedAdamW
from tests.conftest import expect_observing

SIZES = (1, 7, 8, 15, 16, 17, 100, 1000, 16385, 40000)  # every kind of remainder, several chunks


def _pair(cls_ours, cls_torch, groups_kw: list[dict], seed: int = 0, **hyper):
    """The same parameters twice, in groups: ours and torch's fused optimizer over them."""
    generator = torch.Generator().manual_seed(seed)
    values = [torch.randn(n, generator=generator) for n in SIZES]
    ours = [torch.nn.Parameter(v.clone()) for v in values]
    theirs = [torch.nn.Parameter(v.clone()) for v in values]
    half = len(SIZES) // 2

    def groups(params):
        return [{"params": params[:half], **groups_kw[0]}, {"params": params[half:], **groups_kw[1]}]

    return ours, theirs, cls_ours(groups(ours), **hyper), cls_torch(groups(theirs), fused=True, **hyper)


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    ("ours_cls", "torch_cls", "betas"),
    [(ObservedAdamW, torch.optim.AdamW, (0.9, 0.99)), (ObservedAdam, torch.optim.Adam, (0.3, 0.95))],
)
def test_steps_are_bit_identical_to_torch_fused_and_the_statistics_are_the_update(ours_cls, torch_cls, betas):
    """Groups with and without decay, the learning rate changed between steps (a schedule), a tensor without a
    gradient on some steps: weights, moments and step counts equal torch's bit for bit; each step's statistics
    equal an independent float64 recomputation from copies taken around the step."""
    ours, theirs, opt, ref = _pair(
        ours_cls, torch_cls, [{"weight_decay": 0.1}, {"weight_decay": 0.0}], lr=3e-3, betas=betas, eps=1e-8
    )
    if not expect_observing(opt):
        pytest.skip(f"this machine's torch takes its own step ({opt.observing_note})")
    generator = torch.Generator().manual_seed(1)
    for step in range(6):
        for group_ours, group_ref in zip(opt.param_groups, ref.param_groups, strict=True):
            group_ours["lr"] = group_ref["lr"] = 3e-3 * (step + 1) / 6
        for i, (p, q) in enumerate(zip(ours, theirs, strict=True)):
            g = torch.randn(p.shape, generator=generator) * 10.0 ** (step % 3 - 1)
            skip = i == 2 and step % 2 == 1  # no gradient for this tensor on odd steps: untouched by both
            p.grad, q.grad = (None, None) if skip else (g.clone(), g.clone())
        before = [p.detach().clone().double() for p in ours]
        since = opt.steps_taken
        opt.step()
        ref.step()
        assert _same(ours, theirs)
        for p, q in zip(ours, theirs, strict=True):
            if p in opt.state:
                for key in ("exp_avg", "exp_avg_sq", "step"):
                    assert torch.equal(opt.state[p][key], ref.state[q][key]), key
        stepped = [p for p in ours if p.grad is not None]
        update = opt.update_since(stepped, since)
        assert update.status == "measured" and update.stepped.all() and update.all_stepped
        for p, row in zip(stepped, update.figures, strict=True):
            old = before[next(i for i, q in enumerate(ours) if q is p)]
            new = p.detach().double()
            expected = [
                old.square().sum(),
                (new - old).square().sum(),
                new.square().sum(),
                opt.state[p]["exp_avg_sq"].double().sum(),
            ]
            np.testing.assert_allclose(row, [float(e) for e in expected], rtol=1e-6, atol=1e-30)
        if step % 2 == 1:  # a tensor that did not step has no figures from this step
            update = opt.update_since(ours, since)
            assert update.status == "measured" and update.stepped.tolist() == [i != 2 for i in range(len(ours))]
            assert not update.all_stepped
            assert np.isnan(update.figures[2]).all() and not np.isnan(np.delete(update.figures, 2, 0)).any()


def test_state_dict_is_torchs_both_ways():
    """A checkpoint of ours loads into torch's fused AdamW (and back) and training goes on bit for bit."""
    ours, theirs, opt, ref = _pair(ObservedAdamW, torch.optim.AdamW, [{"weight_decay": 0.1}, {}], lr=1e-3)
    for _ in range(2):
        for p, q in zip(ours, theirs, strict=True):
            p.grad = torch.randn(p.shape)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    moved = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    half = len(SIZES) // 2
    plain = torch.optim.AdamW([{"params": moved[:half]}, {"params": moved[half:]}], lr=1e-3, fused=True)
    plain.load_state_dict(opt.state_dict())
    back = ObservedAdamW([{"params": ours[:half]}, {"params": ours[half:]}], lr=1e-3)
    back.load_state_dict(ref.state_dict())
    for p, q in zip(moved, ours, strict=True):
        p.grad = torch.randn(p.shape)
        q.grad = p.grad.clone()
    plain.step()
    back.step()
    assert _same(moved, ours)


def test_a_skipped_step_changes_nothing_and_says_so():
    """found_inf set (the guard's skip, as the trainer passes it to fused optimizers): weights, moments and step
    counts stay; update_since reports no step."""
    ours, _, opt, _ = _pair(ObservedAdamW, torch.optim.AdamW, [{}, {}], lr=1e-2)
    for p in ours:
        p.grad = torch.randn(p.shape)
    opt.step()
    state = {k: v.clone() for k, v in opt.state[ours[0]].items()}
    weights = [p.detach().clone() for p in ours]
    since = opt.steps_taken
    opt.found_inf = torch.ones(())
    opt.step()
    del opt.found_inf
    assert _same(weights, ours) and all(torch.equal(state[k], opt.state[ours[0]][k]) for k in state)
    assert opt.update_since(ours, since).status == "none"


def test_torchs_own_step_is_counted_as_unmeasured():
    """A closure (or anything else the kernel does not take) runs torch's fused step; a reader learns that the
    weights moved without figures for it."""
    ours, _, opt, _ = _pair(ObservedAdamW, torch.optim.AdamW, [{}, {}], lr=1e-2)

    def closure():
        for p in ours:
            p.grad = torch.ones(p.shape)
        return torch.zeros(())

    since = opt.steps_taken
    opt.step(closure)
    assert opt.update_since(ours, since).status == "unmeasured"


def test_falls_back_to_torch_where_it_cannot_be_bit_identical(monkeypatch):
    params = [torch.nn.Parameter(torch.randn(4))]
    assert ObservedAdamW(params, lr=1e-3, amsgrad=True).observing_note == "amsgrad=True"
    assert not ObservedAdamW([torch.nn.Parameter(torch.randn(4, dtype=torch.float64))], lr=1e-3).observing
    # a torch whose kernel rounds differently: the check at construction notices and turns observing off
    real = kernels.adam_step

    def off_by_one_ulp(params, *args, **kwargs):
        out = real(params, *args, **kwargs)
        params[-1].view(torch.int32)[0] += 1
        return out

    monkeypatch.setattr(kernels, "adam_step", off_by_one_ulp)
    opt = ObservedAdamW(params, lr=1e-3)
    assert not opt.observing and "rounds differently" in opt.observing_note
    params[0].grad = torch.ones(4)
    since = opt.steps_taken
    opt.step()  # torch's step, counted
    assert opt.update_since(params, since).status == "unmeasured"


def test_the_check_covers_every_remainder():
    assert {n % 16 for n in CHECK_SIZES} == set(range(16)) and max(CHECK_SIZES) > 16384


def test_groups_with_their_own_betas_step_bit_identically():
    """Groups may carry their own betas and eps (one kernel call per setting): still torch's bits."""
    ours, theirs, opt, ref = _pair(
        ObservedAdamW,
        torch.optim.AdamW,
        [{"betas": (0.8, 0.9), "eps": 1e-6, "weight_decay": 0.05}, {"betas": (0.4, 0.999)}],
        lr=1e-2,
    )
    if not expect_observing(opt):
        pytest.skip(f"this machine's torch takes its own step ({opt.observing_note})")
    for _ in range(3):
        for p, q in zip(ours, theirs, strict=True):
            p.grad = torch.randn(p.shape)
            q.grad = p.grad.clone()
        since = opt.steps_taken
        opt.step()
        ref.step()
        assert _same(ours, theirs) and opt.update_since(ours, since).status == "measured"


def test_groups_added_or_loaded_later_are_checked_again():
    """add_param_group and load_state_dict can change what the kernel would have to do (amsgrad from a checkpoint
    of another optimizer): the optimizer checks again and takes torch's step from then on."""
    opt = ObservedAdamW([torch.nn.Parameter(torch.randn(8))], lr=1e-3)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(5))], "betas": (0.5, 0.9)})
    if not expect_observing(opt):
        pytest.skip(f"this machine's torch takes its own step ({opt.observing_note})")
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3, dtype=torch.float64))]})
    assert not opt.observing and "float32" in opt.observing_note
    params = [torch.nn.Parameter(torch.randn(4))]
    amsgrad = torch.optim.AdamW([torch.nn.Parameter(torch.randn(4))], lr=1e-3, amsgrad=True, fused=True)
    loaded = ObservedAdamW(params, lr=1e-3)
    if not expect_observing(loaded):
        pytest.skip(f"this machine's torch takes its own step ({loaded.observing_note})")
    loaded.load_state_dict(amsgrad.state_dict())
    assert not loaded.observing and loaded.observing_note == "amsgrad=True"
