"""The monitor finds any model's blocks, names layers by module path, and says what it cannot measure.

Models are built from configs with random weights (transformers' GPT-2, Llama, GPT-NeoX, Mistral, Qwen2, ViT; a
nanoGPT-shaped model written here; flowtrain's own GPT). Depth statistics on GPT-2 are checked against a forward
pass written out by hand.
"""

import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from flowtrain.errors import NotAvailable, StructureError
from flowtrain.flow import FlowConfig, FlowMonitor, diagnose
from flowtrain.flow.structure import find_blocks

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", module="transformers")
SMALL = dict(num_hidden_layers=2, num_attention_heads=2, hidden_size=16, intermediate_size=32, vocab_size=50,
             max_position_embeddings=16)  # fmt: skip


def gpt2(layers=2):
    cfg = transformers.GPT2Config(n_layer=layers, n_head=2, n_embd=16, n_positions=16, vocab_size=50,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg)


def one_step(model, monitor, ids):
    opt = monitor.params.optimizer
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    monitor.after_backward()
    if opt is not None:
        opt.step()
    monitor.after_step()
    return monitor.collect(1)


HF = {
    "gpt2": (gpt2, "transformer.h", ["transformer.wte", "transformer.wpe", "transformer.h.0", "transformer.h.1",
                                     "transformer.ln_f"]),
    "llama": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, num_key_value_heads=2)),
              "model.layers", ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "lm_head"]),
    "gpt_neox": (lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**SMALL)), "gpt_neox.layers",
                 ["gpt_neox.embed_in", "gpt_neox.layers.0", "gpt_neox.layers.1", "gpt_neox.final_layer_norm",
                  "lm_head"]),
    "mistral": (lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**SMALL, num_key_value_heads=1)),
                "model.layers", ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "lm_head"]),
    "qwen2": (lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL, num_key_value_heads=1)),
              "model.layers", ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "lm_head"]),
}  # fmt: skip


@pytest.mark.parametrize("arch", list(HF))
def test_transformers_models_get_their_blocks_and_module_path_layers(arch):
    torch.manual_seed(0)
    make, container, layers = HF[arch]
    model = make()
    monitor = FlowMonitor(model, torch.optim.AdamW(model.parameters(), lr=1e-3), FlowConfig(interval=1))
    assert monitor.structure["blocks"].startswith(f"{container} (2 x ")
    assert monitor.structure["head"] == "lm_head"
    rec = one_step(model, monitor, torch.randint(0, 50, (2, 8)))
    assert rec.layer_names == layers
    assert rec.depth_layers == [layers[0], f"{container}.0", f"{container}.1"]
    for stat in ("resid_grad_norm", "act_rms", "act_max_abs"):
        values = rec.depth(stat)
        assert len(values) == 3 and all(math.isfinite(v) and v > 0 for v in values), (stat, values)
    assert math.isfinite(rec.scalars["logits_lse_mean"])
    # the attention runs in SDPA: unavailable, said so, and absent (not NaN) from what is asked
    for stat in ("attn_entropy", "attn_max_logit"):
        with pytest.raises(NotAvailable, match=f"{stat} is not available for this model: .*fused kernel"):
            rec.depth(stat)
    monitor.remove()


def test_vit_blocks_are_found_and_a_missing_head_is_unavailable():
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=16, intermediate_size=32,
                                 image_size=8, patch_size=4, num_labels=3)  # fmt: skip
    model = transformers.ViTForImageClassification(cfg)
    container, _ = find_blocks(model)
    monitor = FlowMonitor(model, None, FlowConfig(interval=1))
    model(pixel_values=torch.randn(2, 3, 8, 8), labels=torch.tensor([0, 1])).loss.backward()
    monitor.after_backward()
    monitor.after_step()
    rec = monitor.collect(1)
    assert rec.layer_names == ["vit.embeddings", f"{container}.0", f"{container}.1", "vit.layernorm", "classifier"]
    assert all(v > 0 for v in rec.depth("act_rms"))
    assert "logits_lse_mean" not in rec.scalars and "pass head=" in rec.unavailable["logits_lse_mean"]


class NanoBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        q, k, v = self.c_attn(self.ln_1(x)).split(x.shape[-1], dim=-1)
        x = x + self.c_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """nanoGPT's layout: transformer = ModuleDict(wte, wpe, h, ln_f), lm_head tied to wte."""

    def __init__(self, vocab=50, d=16, layers=3, ctx=16):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(vocab, d), wpe=nn.Embedding(ctx, d),
                                              h=nn.ModuleList(NanoBlock(d) for _ in range(layers)),
                                              ln_f=nn.LayerNorm(d)))  # fmt: skip
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.transformer.wte.weight

    def forward(self, idx):
        t = self.transformer
        x = t.wte(idx) + t.wpe(torch.arange(idx.shape[1]))
        for block in t.h:
            x = block(x)
        return self.lm_head(t.ln_f(x))


def nano_step(model, monitor):
    idx = torch.randint(0, 50, (2, 8))
    F.cross_entropy(model(idx).flatten(0, 1), idx.roll(-1, 1).flatten()).backward()
    monitor.after_backward()
    monitor.after_step()
    return monitor.collect(1)


@pytest.mark.parametrize(
    "blocks", [None, "transformer.h", ["transformer.h.0", "transformer.h.1", "transformer.h.2"], "module"]
)
def test_nanogpt_shape_found_or_given_the_same_way(blocks):
    torch.manual_seed(0)
    model = NanoGPT()
    given = model.transformer.h if blocks == "module" else blocks
    rec = nano_step(model, FlowMonitor(model, None, FlowConfig(interval=1), blocks=given))
    assert rec.layer_names == ["transformer.wte", "transformer.wpe", "transformer.h.0", "transformer.h.1",
                               "transformer.h.2", "transformer.ln_f"]  # fmt: skip
    assert len(rec.depth("resid_grad_norm")) == 4


def test_bad_structure_arguments_are_one_line_errors():
    model = NanoGPT()
    with pytest.raises(StructureError, match=r"blocks='transformer\.hh'.*did you mean 'transformer\.h'"):
        FlowMonitor(model, None, blocks="transformer.hh")
    with pytest.raises(StructureError, match="names a Linear, not a ModuleList"):
        FlowMonitor(model, None, blocks="lm_head")
    with pytest.raises(StructureError, match="not a module of the model"):
        FlowMonitor(model, None, blocks=[nn.Linear(2, 2)])
    with pytest.raises(StructureError, match="head='head'"):
        FlowMonitor(model, None, head="head")


def test_a_model_without_blocks_is_inconclusive_never_healthy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))  # no repeated blocks
    monitor = FlowMonitor(model, torch.optim.SGD(model.parameters(), lr=1e-3), FlowConfig(interval=1))
    records = []
    for step in range(3):
        F.mse_loss(model(torch.randn(5, 4)), torch.zeros(5, 2)).backward()
        monitor.after_backward()
        monitor.params.optimizer.step()
        monitor.after_step()
        monitor.params.optimizer.zero_grad()
        records.append(monitor.collect(step))
    with pytest.raises(NotAvailable, match="no repeated blocks found in Sequential.*blocks="):
        records[0].depth("act_rms")
    result = diagnose(records)
    assert result.verdict == "inconclusive"
    assert "vanishing and exploding" in result.cause and "blocks=" in result.suggestion
    assert "not judged: vanishing" in result.render()


def test_depth_on_gpt2_matches_a_forward_pass_written_out():
    torch.manual_seed(0)
    model = gpt2(layers=3)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    monitor = FlowMonitor(model, torch.optim.AdamW(model.parameters(), lr=1e-3), FlowConfig(interval=1))
    ids = torch.randint(0, 50, (2, 8))
    rec = one_step(model, monitor, ids)
    # the same forward by hand, on the weights before the step: embeddings, blocks, final norm, tied head,
    # shifted cross-entropy
    model.load_state_dict(weights)
    t = model.transformer
    hs = [t.wte(ids) + t.wpe(torch.arange(8))]
    for block in t.h:
        hs.append(block(hs[-1]))
    logits = model.lm_head(t.ln_f(hs[-1]))
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    grads = torch.autograd.grad(loss, hs)
    for got, want in zip(rec.depth("resid_grad_norm"), grads, strict=True):
        assert got == pytest.approx(float(want.double().norm()), rel=1e-5)
    for got, h in zip(rec.depth("act_rms"), hs, strict=True):
        assert got == pytest.approx(float(h.detach().double().pow(2).mean().sqrt()), rel=1e-5)
    result = diagnose([rec])
    assert result.verdict == "healthy" and set(result.unjudged) == {"attention_logit_growth", "attention_collapse"}


def test_flowtrains_gpt_keeps_its_layer_names_and_attention():
    from flowtrain.model.config import ModelConfig
    from flowtrain.model.gpt import GPT

    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=32))
    monitor = FlowMonitor(model, None, FlowConfig(interval=1))
    idx = torch.randint(0, 32, (2, 8))
    F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    monitor.after_backward()
    monitor.after_step()
    rec = monitor.collect(1)
    assert rec.layer_names == ["embedding", "block.0", "block.1", "head"] and rec.unavailable == {}
    assert all(math.isfinite(v) for v in rec.depth("attn_entropy")[1:])


def test_blocks_called_by_keyword_and_returning_tuples_are_measured():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, hidden_states):
            return (hidden_states + torch.tanh(self.lin(hidden_states)), None)  # transformers 4.x style

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(Block() for _ in range(2))

        def forward(self, x):
            for layer in self.layers:
                x = layer(hidden_states=x)[0]
            return x

    torch.manual_seed(0)
    model = Model()
    monitor = FlowMonitor(model, None, FlowConfig(interval=1))
    x = torch.randn(3, 4, requires_grad=True)
    hs = [x]
    model(x).square().sum().backward()
    monitor.after_backward()
    monitor.after_step()
    rec = monitor.collect(1)
    assert rec.depth_layers == ["input", "layers.0", "layers.1"]  # h_0: no parameter outside the blocks
    assert rec.depth("act_rms")[0] == pytest.approx(float(hs[0].detach().pow(2).mean().sqrt()), rel=1e-6)
    assert all(v > 0 for v in rec.depth("resid_grad_norm"))
