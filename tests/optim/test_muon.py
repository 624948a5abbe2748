"""optim.name=muon: torch's Muon on the blocks' matrices and torch's AdamW on the rest, as one optimizer."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from pydantic import ValidationError

from flowtrain.model.config import ModelConfig
from flowtrain.model.gpt import GPT
from flowtrain.optim.config import OptimConfig, ScheduleConfig
from flowtrain.optim.muon import MUON_SETTINGS
from flowtrain.optim.optimizers import build_optimizer
from flowtrain.optim.schedules import build_scheduler

LR, WD = 3e-3, 0.1


def tiny(tied: bool = False) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=23, tie_embeddings=tied))


def backward(model: GPT, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 23, (4, 16), generator=gen)
    model.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten()).backward()


def test_groups_matrices_of_the_blocks_go_to_muon_the_head_and_the_rest_to_adamw():
    model = tiny(tied=False)
    opt = build_optimizer(model, OptimConfig(name="muon", lr=LR, weight_decay=WD), "cpu")
    names = {g["name"]: g["names"] for g in opt.param_groups}
    expected = [n for n, p in model.named_parameters() if p.ndim == 2 and n.startswith("blocks.")]
    assert names["muon"] == expected
    assert names["decay"] == ["lm_head.weight"]  # untied head: AdamW, with decay
    assert "tok_emb.weight" in names["no_decay"] and all(n not in names["no_decay"] for n in expected)
    assert [type(h).__name__ for h in opt.halves] == ["Muon", "AdamW"]
    decaying = build_optimizer(model, OptimConfig(name="muon", no_decay=["bias", "norm"]), "cpu")
    groups = {g["name"]: g["names"] for g in decaying.param_groups}
    assert groups["muon"] == expected and "tok_emb.weight" in groups["decay"]  # embeddings never go to Muon


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_steps_equal_torchs_muon_and_adamw_stepped_side_by_side(scale):
    """The composite changes nothing: the same bits as the two torch optimizers torch's docs pair, under a
    schedule that moves the LR of every group (optim.adamw_lr_scale: AdamW's peak a multiple of Muon's)."""
    ours, theirs = tiny(), tiny()
    opt = build_optimizer(ours, OptimConfig(name="muon", lr=LR, adamw_lr_scale=scale, weight_decay=WD), "cpu")
    names = {g["name"]: set(g["names"]) for g in opt.param_groups}
    by_name = dict(theirs.named_parameters())
    muon = torch.optim.Muon([by_name[n] for n in sorted(names["muon"])], lr=LR, weight_decay=WD, **MUON_SETTINGS)
    decay = [by_name[n] for n in sorted(names.get("decay", ()))]
    adamw = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WD}, {"params": [by_name[n] for n in sorted(names["no_decay"])],
                                                 "weight_decay": 0.0}],
        lr=LR * scale, betas=(0.9, 0.99), eps=1e-8, fused=True,
    )  # fmt: skip
    schedule = ScheduleConfig(kind="cosine", warmup_steps=2, min_lr=1e-4)
    scheds = [build_scheduler(o, schedule, LR, 6) for o in (opt, muon, adamw)]
    for step in range(5):
        backward(ours, step)
        backward(theirs, step)
        opt.step()
        muon.step()
        adamw.step()
        for s in scheds:
            s.step()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_adamw_lr_scale_is_refused_without_muon():
    with pytest.raises(ValidationError, match="set optim.adamw_lr_scale=1 or optim.name=muon"):
        OptimConfig(name="adamw", adamw_lr_scale=10)
    assert OptimConfig(name="adamw", adamw_lr_scale=1).name == "adamw"


def test_a_muon_update_is_the_orthogonalized_gradient_at_adamws_rms():
    """Checked against a float64 SVD: the first update of a matrix points along U V^T of its gradient (G = U S
    V^T), nearly all its singular values are near 1 (Newton-Schulz in bf16 gives 0.5-1.5), and it moves the
    weights by an RMS of 0.2 x lr (Moonshot's match-RMS scaling), on top of the decoupled decay lr x wd x W."""
    model = tiny()
    opt = build_optimizer(model, OptimConfig(name="muon", lr=LR, weight_decay=WD), "cpu")
    backward(model, 0)
    w = model.blocks[0].mlp.fc.weight
    before, grad = w.detach().clone(), w.grad.detach().double()
    opt.step()
    update = (w.detach().double() - before.double() * (1 - LR * WD)) / -(LR * 0.2 * math.sqrt(max(w.shape)))
    u, _, vh = torch.linalg.svd(grad, full_matrices=False)
    polar = u @ vh
    cosine = (update * polar).sum() / (update.norm() * polar.norm())
    assert cosine > 0.95
    sv = torch.linalg.svdvals(update)  # five bf16 steps lift all but the gradient's tiniest directions
    assert sv.max() < 1.6 and ((sv > 0.5).double().mean() > 0.9)
    rms = (w.detach().double() - before.double() * (1 - LR * WD)).pow(2).mean().sqrt()
    assert 0.5 * 0.2 * LR < rms < 1.5 * 0.2 * LR


def test_state_dict_round_trips_through_a_safe_load_and_steps_on_identically():
    a = tiny()
    opt_a = build_optimizer(a, OptimConfig(name="muon", lr=LR), "cpu")
    backward(a, 0)
    opt_a.step()
    b = copy.deepcopy(a)
    opt_b = build_optimizer(b, OptimConfig(name="muon", lr=LR), "cpu")
    buffer = io.BytesIO()
    torch.save(opt_a.state_dict(), buffer)
    buffer.seek(0)
    opt_b.load_state_dict(torch.load(buffer, weights_only=True))
    assert all(h.state is opt_b.state for h in opt_b.halves)  # both halves see the loaded moments
    for model, opt in ((a, opt_a), (b, opt_b)):
        for step in (1, 2):
            backward(model, step)
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
