import json

import pytest
import torch
from safetensors.torch import load_file

from flowtrain.errors import CheckpointError
from flowtrain.train import checkpoint as ckpt
from flowtrain.train.runtime import rng_state


class Tied(torch.nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.emb = torch.nn.Embedding(10, width)
        self.head = torch.nn.Linear(width, 10, bias=False)
        self.head.weight = self.emb.weight


def _save(tmp_path, model=None, step=3):
    model = model or Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model.emb.weight.sum().backward()
    opt.step()
    path = ckpt.save_checkpoint(
        tmp_path / "checkpoints",
        step,
        model=model,
        optimizer=opt,
        rng=rng_state(),
        state={"loader": {"position": 7}},
        tokenizer_json="{}",
        config_yaml="model: {}\n",
    )
    return path, model, opt


def test_roundtrip_weights_optimizer_state(tmp_path):
    path, model, opt = _save(tmp_path)
    assert path.name == "step_000003"
    c = ckpt.read_checkpoint(path)
    assert c.step == 3 and c.state["loader"] == {"position": 7}
    fresh = Tied()
    ckpt.restore_model(c, fresh)
    assert torch.equal(fresh.emb.weight, model.emb.weight)
    assert fresh.head.weight is fresh.emb.weight  # tying survives
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    ckpt.restore_optimizer(c, opt2)
    s1, s2 = opt.state_dict()["state"][0], opt2.state_dict()["state"][0]
    assert torch.equal(s1["exp_avg_sq"], s2["exp_avg_sq"])
    assert set(load_file(str(path / "rng.safetensors"))) >= {"torch_cpu"}
    # nothing temporary left behind
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000003"]


def test_truncated_file_is_detected(tmp_path):
    path, _, _ = _save(tmp_path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        ckpt.read_checkpoint(path)


def test_incomplete_checkpoint_is_not_listed_or_loaded(tmp_path):
    path, _, _ = _save(tmp_path)
    (path / "meta.json").unlink()
    assert ckpt.list_checkpoints(tmp_path / "checkpoints") == []
    with pytest.raises(CheckpointError, match="incomplete"):
        ckpt.read_checkpoint(path)


def test_crash_while_writing_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError):
        _save(tmp_path)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_other_shape_is_refused_with_the_tensor_name(tmp_path):
    path, _, _ = _save(tmp_path)
    with pytest.raises(CheckpointError, match=r"different model shape: emb.weight is \[10, 4\]"):
        ckpt.restore_model(ckpt.read_checkpoint(path), Tied(width=8))


def test_prune_keeps_last_and_best(tmp_path):
    for step in (1, 2, 3, 4, 5):
        _save(tmp_path, step=step)
    ckpt.prune_checkpoints(tmp_path / "checkpoints", keep_last=2, keep_steps={2})
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [2, 4, 5]


def test_meta_lists_hashes_of_every_file(tmp_path):
    path, _, _ = _save(tmp_path)
    meta = json.loads((path / "meta.json").read_text())
    assert set(meta["sha256"]) == {p.name for p in path.iterdir()} - {"meta.json"}
