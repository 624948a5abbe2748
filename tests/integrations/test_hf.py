"""The transformers callback on a real Trainer: a tiny random GPT-2, gradient accumulation and a max_grad_norm that
clips every step. The recorded pre-clip norm and loss are the Trainer's own logged ones; the depth statistics of
a step match a forward pass written out by hand on the weights and rows of that step; report and diagnose read
the run directory."""

import json
import warnings

import pytest
import torch
import yaml
from torch.nn import functional as F

from flowtrain import cli
from flowtrain.flow import FlowConfig
from flowtrain.flow.stored import read_records

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it
from flowtrain.integrations.hf import FlowtrainCallback  # noqa: E402

ROWS, SEQ, MAX_NORM = 8, 16, 0.05


class WeightsBefore(transformers.TrainerCallback):
    """The weights as a given step starts (a copy, for the recomputation)."""

    def __init__(self, step):
        self.step, self.weights = step, None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}


def tiny_gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=SEQ, vocab_size=50, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg)


def test_trainer_run_recorded_pre_clip_and_checked(tmp_path, capsys):
    warnings.filterwarnings("ignore", module="transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = tiny_gpt2()
    ids = torch.randint(0, 50, (ROWS, SEQ))
    data = [{"input_ids": r, "labels": r} for r in ids]
    run, before = tmp_path / "run", WeightsBefore(step=2)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), max_steps=4, per_device_train_batch_size=ROWS // 2,
        gradient_accumulation_steps=2, max_grad_norm=MAX_NORM, learning_rate=1e-3, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    callback = FlowtrainCallback(run, flow=FlowConfig(interval=1))
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback, before])
    trainer.train()

    logged = [h for h in trainer.state.log_history if "grad_norm" in h]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [h["step"] for h in logged] == [1, 2, 3, 4]
    for row, hf in zip(rows, logged, strict=True):
        assert row["grad_norm_preclip"] == pytest.approx(hf["grad_norm"], rel=1e-6)  # HF logs the pre-clip norm
        assert row["grad_norm_preclip"] > 5 * MAX_NORM and row["clipped"] is True
        assert row["grad_norm_postclip"] == pytest.approx(MAX_NORM, rel=1e-5)  # what the optimizer got
        assert row["loss"] == pytest.approx(hf["loss"], rel=1e-6)
        assert row["lr"] == pytest.approx(hf["learning_rate"], rel=1e-9)

    # step 2 recomputed: all rows of the dataset (the step's two micro-batches, in another order), the loss as
    # the Trainer scales it (the summed token losses over num_items_in_batch, which counts every label of the
    # step here: ROWS * SEQ), a forward pass written out
    records = read_records(run / "flow.parquet")
    for row, each in zip(rows, records, strict=True):  # the per-tensor figures are of the pre-clip gradients too
        per_tensor = each.tensor_stats[:, 0].astype("float64")  # grad_norm
        assert float((per_tensor**2).sum() ** 0.5) == pytest.approx(row["grad_norm_preclip"], rel=1e-5)
    rec = records[1]
    assert rec.step == 2 and rec.depth_layers == ["transformer.wte", "transformer.h.0", "transformer.h.1"]
    twin = tiny_gpt2()
    twin.load_state_dict(before.weights)
    t = twin.transformer
    hs = [t.wte(ids) + t.wpe(torch.arange(SEQ))]
    for block in t.h:
        hs.append(block(hs[-1]))
    logits = twin.lm_head(t.ln_f(hs[-1]))
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum") / (ROWS * SEQ)
    grads = torch.autograd.grad(loss, hs, retain_graph=True)
    total = torch.nn.utils.get_total_norm(torch.autograd.grad(loss, list(twin.parameters())))
    assert float(total) == pytest.approx(logged[1]["grad_norm"], rel=1e-5)  # the recomputation is of this step
    resid = [float(g.double().norm()) for g in grads]
    act = [float(h.detach().double().pow(2).mean().sqrt()) for h in hs]
    assert rec.depth("resid_grad_norm") == pytest.approx(resid, rel=1e-5)
    assert rec.depth("act_rms") == pytest.approx(act, rel=1e-5)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["observed"]["loop"] == "transformers.Trainer" and config["clip"]["max_norm"] == MAX_NORM
    assert config["model"]["blocks"] == "transformer.h (2 x GPT2Block)"
    assert "fused kernel" in config["unavailable"]["attn_entropy"]
    with capsys.disabled():  # the figures, for whoever runs it with -s
        print(f"\nhf preclip {[r['grad_norm_preclip'] for r in rows]}\n   logged {[h['grad_norm'] for h in logged]}")
        print(f"hf resid {rec.depth('resid_grad_norm')}\n   recomputed {resid}")
        print(f"hf act_rms {rec.depth('act_rms')}\n   recomputed {act}")

    assert cli.main(["report", str(run)]) == 0
    assert cli.main(["diagnose", str(run), "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "recorded by transformers.Trainer" in out and "verdict: " in out and "transformer.h.1" in out
    assert "not judged: attention_collapse: attn_entropy is not available for this model" in out
