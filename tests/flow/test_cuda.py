"""The microscope on a CUDA device: the same checks as on the CPU (independent float64 recomputation, 1e-6
relative), through the device path (torch's fused reductions, figures kept on the GPU until collected).

Skipped where no CUDA device is visible (CI); run on a lent GPU with `benchmarks/cuda_checks.sh`.
"""

import copy
import math

import pytest
import torch

from flowtrain.flow import FlowConfig, FlowMonitor
from flowtrain.model.config import ModelConfig
from flowtrain.model.gpt import GPT
from tests.flow.test_depth import check_depth, check_sampled_entropy, lm_loss, reference_forward
from tests.flow.test_param_stats import close, norm, one_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")


@pytest.fixture(autouse=True)
def _exact_matmuls():
    """TF32 would round the forward differently from nothing we compare against; keep fp32 matmuls exact."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("fused", [True, False], ids=["fused-adamw", "foreach-adamw"])
def test_per_tensor_and_global_statistics_on_cuda(fused):
    model, opt, monitor, grads, weights, clip, records = one_step(device="cuda", fused=fused, foreach=not fused)
    assert monitor.params._snapshot is not None  # on the GPU the update comes from a copy of the weights
    rec = records[-1]
    for name, p in model.named_parameters():
        s = rec.tensor(name)
        assert p.device.type == "cuda"
        if name in grads:
            g = grads[name]
            close(s["grad_norm"], norm(g))
            close(s["grad_max_abs"], float(g.abs().max()))
            close(s["grad_rms"], math.sqrt(float((g.double() ** 2).mean())))
            close(s["adam_v_rms"], math.sqrt(float(opt.state[p]["exp_avg_sq"].double().mean())))
        else:
            assert math.isnan(s["grad_norm"])
        close(s["weight_norm"], norm(weights[name]))
        close(s["update_norm"], norm(p.detach() - weights[name]))
    sc = rec.scalars
    close(sc["grad_norm_preclip"], math.sqrt(sum(norm(g) ** 2 for g in grads.values())), rel=1e-5)
    close(sc["param_norm"], math.sqrt(sum(norm(w) ** 2 for w in weights.values())))


def test_depth_statistics_on_cuda():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=3, n_head=2, n_embd=32, block_size=16, vocab_size=17)).cuda()
    ref = copy.deepcopy(model)
    monitor = FlowMonitor(model, None, FlowConfig(attn_positions=4))
    idx = torch.randint(0, 17, (3, 16), device="cuda")
    lm_loss(model(idx), idx).backward()
    monitor.after_backward()
    monitor.after_step()
    rec = monitor.collect(0)
    hs = reference_forward(ref, idx, ref.blocks, ref.embed)
    logits = ref.lm_head(ref.norm_f(hs[-1]))
    lm_loss(logits, idx).backward()
    check_depth(rec, hs)
    close(rec.scalars["logits_max_abs"], float(logits.detach().abs().max()))
    check_sampled_entropy(rec, ref.blocks, hs, torch.linspace(0, 15, 4).round().long().cuda())


def test_a_monitored_step_never_waits_for_the_gpu():
    """after_backward/after_step only queue device work: no .item(), no host->device copy that syncs; the one
    transfer is collect()'s. (Caches are filled by a first step, as in a run.)"""
    from flowtrain.optim.clipping import GradClipper
    from flowtrain.optim.config import ClipConfig

    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=17)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    clipper = GradClipper(ClipConfig(kind="norm", max_norm=1.0))
    monitor = FlowMonitor(model, opt, FlowConfig())
    params = list(model.parameters())
    idx = torch.randint(0, 17, (4, 16), device="cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        for micro in idx.split(2):  # two micro-batches
            (lm_loss(model(micro), micro) / 2).backward()
        monitor.after_backward()
        clip = clipper(params)
        opt.step()
        monitor.after_step(clip_stats=clip)

    step()
    monitor.collect(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    records = monitor.collect_all(2)
    assert [r.step for r in records] == [1, 2]
    for r in records:
        assert all(math.isfinite(v) for v in r.depth("resid_grad_norm") + r.depth("act_rms"))
        assert math.isfinite(r.scalars["logits_lse_mean"]) and r.tensor_stats.shape[0] == len(params)


def test_non_finite_gradients_on_cuda_are_counted_and_propagate():
    *_, records = one_step(device="cuda", poison="blocks.1.mlp.0.weight", fused=True)
    rec = records[-1]
    s = rec.tensor("blocks.1.mlp.0.weight")
    assert s["grad_nonfinite"] == 1 and math.isnan(s["grad_max_abs"]) and math.isnan(s["grad_norm"])
    assert rec.scalars["grad_nonfinite"] == 1
    assert math.isfinite(rec.tensor("blocks.0.mlp.0.weight")["grad_max_abs"])


def test_bf16_activations_are_measured_in_float32():
    """Under autocast the block outputs are bfloat16; their statistics are accumulated in float32 (a bf16
    norm would be off by ~1e-3)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=17)).cuda()
    ref = copy.deepcopy(model)
    monitor = FlowMonitor(model, None, FlowConfig(attention=False))
    idx = torch.randint(0, 17, (3, 16), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = lm_loss(model(idx).float(), idx)
    loss.backward()
    monitor.after_backward()
    monitor.after_step()
    rec = monitor.collect(0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        hs = reference_forward(ref, idx, ref.blocks, ref.embed)
    for got, h in zip(rec.depth("act_rms"), hs, strict=True):
        close(got, math.sqrt(float((h.detach().double() ** 2).mean())), rel=1e-5)
