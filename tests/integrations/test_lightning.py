"""The Lightning callback on a real lightning.Trainer: a small transformer, gradient accumulation and a
gradient_clip_val that clips every step. The recorded pre-clip norm is the one the module itself measures before
Lightning clips; the depth statistics of a step match a forward pass written out by hand; report and diagnose
read the run directory."""

import json
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from flowtrain import cli
from flowtrain.flow import FlowConfig
from flowtrain.flow.stored import read_records

L = pytest.importorskip("lightning")
from flowtrain.integrations.lightning import FlowtrainCallback  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1] / "flow"))
from tiny_models import TinyTransformer  # noqa: E402

ROWS, SEQ, CLIP = 8, 8, 0.05


class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = TinyTransformer(ctx=SEQ)
        self.norms, self.losses, self.weights = [], [], {}

    def training_step(self, batch, batch_idx):
        (idx,) = batch
        loss = F.cross_entropy(self.net(idx).flatten(0, 1), idx.roll(-1, 1).flatten())
        self.losses.append(float(loss.detach()))
        return loss

    def on_train_batch_start(self, batch, batch_idx):
        if batch_idx % 2 == 0:  # the first micro-batch of a step: the weights that step starts from
            self.weights[self.trainer.global_step + 1] = {k: v.clone() for k, v in self.net.state_dict().items()}

    def on_before_optimizer_step(self, optimizer):
        # the module's hook runs after the callbacks' and before Lightning clips: an independent pre-clip norm
        self.norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in self.parameters()])))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_lightning_run_recorded_pre_clip_and_checked(tmp_path, capsys):
    torch.manual_seed(0)
    ids = torch.randint(0, 17, (ROWS, SEQ))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=ROWS // 2)
    module, run = Module(), tmp_path / "run"
    trainer = L.Trainer(
        max_steps=4, gradient_clip_val=CLIP, accumulate_grad_batches=2, accelerator="cpu", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[FlowtrainCallback(run, flow=FlowConfig(interval=1))], default_root_dir=str(tmp_path),
    )  # fmt: skip
    trainer.fit(module, loader)

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and len(module.norms) == 4
    for i, (row, norm) in enumerate(zip(rows, module.norms, strict=True)):
        assert row["grad_norm_preclip"] == pytest.approx(norm, rel=1e-6)
        assert row["grad_norm_preclip"] > 5 * CLIP and row["clipped"] is True
        assert row["grad_norm_postclip"] == pytest.approx(CLIP, rel=1e-5)
        assert row["loss"] == pytest.approx(sum(module.losses[2 * i : 2 * i + 2]) / 2, rel=1e-6)

    # step 2 recomputed: both micro-batches (all rows, in order), the mean loss, the forward written out
    rec = read_records(run / "flow.parquet")[1]
    assert rec.step == 2 and rec.depth_layers == ["net.tok_emb", "net.blocks.0", "net.blocks.1", "net.blocks.2"]
    net = TinyTransformer(ctx=SEQ)
    net.load_state_dict(module.weights[2])
    hs = [net.tok_emb(ids) + net.pos_emb(torch.arange(SEQ))]
    for block in net.blocks:
        hs.append(block(hs[-1]))
    loss = F.cross_entropy(net.lm_head(net.norm_f(hs[-1])).flatten(0, 1), ids.roll(-1, 1).flatten())
    resid = [float(g.double().norm()) for g in torch.autograd.grad(loss, hs)]
    act = [float(h.detach().double().pow(2).mean().sqrt()) for h in hs]
    assert rec.depth("resid_grad_norm") == pytest.approx(resid, rel=1e-5)
    assert rec.depth("act_rms") == pytest.approx(act, rel=1e-5)
    with capsys.disabled():
        print(f"\nlightning preclip {[r['grad_norm_preclip'] for r in rows]}\n   module's {module.norms}")
        print(f"lightning resid {rec.depth('resid_grad_norm')}\n   recomputed {resid}")
        print(f"lightning act_rms {rec.depth('act_rms')}\n   recomputed {act}")

    assert cli.main(["report", str(run)]) == 0
    assert cli.main(["diagnose", str(run)]) == 0
    out = capsys.readouterr().out
    assert "recorded by lightning.Trainer" in out and "net.blocks.2" in out and "verdict: " in out
