"""model.init_from: a real `flowtrain train` run starts from a transformers directory or a flowtrain run. Its first
loss must be the source model's loss on the run's first batch, computed by the source's own code."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from flowtrain import cli
from flowtrain.config import load_run_config
from flowtrain.data.dataset import TokenDataset
from flowtrain.data.loader import IGNORE_INDEX, BatchLoader
from flowtrain.data.prepare import dataset_for
from flowtrain.interop.source import open_source
from flowtrain.train.load import load_trained
from tests.conftest import tiny_overrides
from tests.interop.conftest import save_hf_model, train_run, transformers

QUICK = {
    "train.max_steps": 3,
    "train.eval_interval": 3,
    "train.checkpoint_interval": 3,
    "schedule.warmup_steps": 1,
    "train.sample_tokens": 0,
}


def train_from(tmp_path, text, source, name, *extra: str) -> tuple[int, str]:
    over = tiny_overrides(text, tmp_path, **{**QUICK, "train.run_name": name, "model.init_from": source})
    return cli.main(["train", *over, *extra])


def first_batch_and_loss(run):
    """The run's first training batch (its own loader, same seed), and the loss it logged for step 1."""
    cfg = load_run_config(run / "config.yaml")
    dataset = TokenDataset.open(dataset_for(cfg.data, progress=False))
    batch = BatchLoader(
        dataset,
        "train",
        cfg.train.batch_size,
        cfg.model.block_size,
        cfg.data.loader,
        cfg.train.seed,
        rank=0,
        world_size=cfg.train.grad_accum,
    ).next()
    step1 = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert step1["step"] == 1
    return cfg, dataset, batch, step1["loss"]


def cross_entropy(logits, targets) -> float:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX).item()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_training_from_a_transformers_directory_starts_at_its_loss(family, tmp_path, small_text):
    theirs = save_hf_model(family, tmp_path / family)
    assert train_from(tmp_path, small_text, tmp_path / family, "tuned") == 0
    run = tmp_path / "runs" / "tuned"
    cfg, dataset, batch, logged = first_batch_and_loss(run)
    # the data was tokenized by the source's tokenizer, and the model is the source's
    assert cfg.data.tokenizer_path == str(tmp_path / family)
    assert dataset.tokenizer.eot_text == ("</s>" if family == "llama" else "<|endoftext|>")
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.vocab_size) == (2, 32, theirs.config.vocab_size)
    assert cfg.model.block_size == 32  # tiny_overrides' context, shorter than the source's 64
    with torch.no_grad():
        expected = cross_entropy(theirs(input_ids=batch.inputs).logits, batch.targets)
    print(f"{family}: first loss {logged:.7f}, transformers on that batch {expected:.7f}, diff {logged - expected:.1e}")
    assert abs(logged - expected) <= 1e-5
    # and back: the fine-tuned run exports with the source's tokenizer (Llama's </s> included) and family
    assert cli.main(["export", str(run), "-o", str(tmp_path / "back"), "--verify"]) == 0
    back = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "back"))
    assert back.eos_token == dataset.tokenizer.eot_text
    assert open_source(tmp_path / "back").tokenizer.fingerprint == dataset.tokenizer.fingerprint
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["model_type"] == family
    assert config.get("n_positions", 32) == 32 and config.get("intermediate_size", 44) == 44  # the run's, the source's


def test_training_from_a_flowtrain_run_starts_at_its_loss_and_resumes(tmp_path, small_text):
    source = train_run(tmp_path, small_text, "source", "model.pos_encoding=rope", "model.qk_norm=true", steps=4)
    assert (
        train_from(
            tmp_path,
            small_text,
            source,
            "tuned",
            "train.max_steps=4",
            "train.checkpoint_interval=2",
            "--stop-after",
            "2",
        )
        == 0
    )
    run = tmp_path / "runs" / "tuned"
    cfg, _, batch, logged = first_batch_and_loss(run)
    assert cfg.model.qk_norm and cfg.model.pos_encoding == "rope"  # any flowtrain architecture comes along
    model = load_trained(source).model
    with torch.no_grad():
        expected = cross_entropy(model(batch.inputs), batch.targets)
    assert abs(logged - expected) <= 1e-6
    # a resumed run's weights come from its checkpoint, its config from the run: the source's weights are not
    # read again (its tokenizer file is, like data.sources: the data cache is keyed by it)
    for weights in (source / "checkpoints").glob("*/model.safetensors"):
        weights.unlink()
    assert cli.main(["train", "--resume", str(run)]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 4


def test_a_conflicting_setting_is_one_line_naming_both_values(tmp_path, small_text, capsys):
    save_hf_model("gpt2", tmp_path / "gpt2")
    capsys.readouterr()
    assert train_from(tmp_path, small_text, tmp_path / "gpt2", "a", "model.n_layer=3") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.n_layer=3 conflicts with model.init_from" in err and "n_layer=2" in err
    assert train_from(tmp_path, small_text, tmp_path / "gpt2", "b", "model.block_size=128") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.block_size=128" in err and "block_size=64" in err
    assert train_from(tmp_path, small_text, tmp_path / "gpt2", "c", "model.mlp_ratio=2") == 2
    assert "model.mlp_ratio=2.0 conflicts" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "a").exists()  # a run refused before it started leaves nothing


def test_the_config_file_architecture_gives_way_to_init_from(tmp_path, small_text):
    """A shipped config's model section describes a model from scratch: init_from replaces it."""
    save_hf_model("gpt2", tmp_path / "gpt2")
    over = tiny_overrides(
        small_text, tmp_path, **{**QUICK, "train.run_name": "s", "model.init_from": tmp_path / "gpt2"}
    )
    over = [o for o in over if not o.startswith("model.") or o.startswith("model.init_from")]
    assert cli.main(["train", "-c", "shakespeare-char", *over, "model.block_size=32"]) == 0
    cfg = load_run_config(tmp_path / "runs" / "s" / "config.yaml")
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.bias) == (2, 2, 32, True)


def test_pickle_only_and_unknown_sources_are_one_line(tmp_path, small_text, capsys):
    model = save_hf_model("gpt2", tmp_path / "bin")
    (tmp_path / "bin" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    capsys.readouterr()
    assert train_from(tmp_path, small_text, tmp_path / "bin", "a") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pytorch_model.bin" in err and "safe_serialization=True" in err
    (tmp_path / "empty").mkdir()
    assert train_from(tmp_path, small_text, tmp_path / "empty", "b") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "neither a transformers model directory" in err
