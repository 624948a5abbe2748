"""Everything checkable is checked before step 1: the checks on their own, then through the Trainer (nothing is
written, nothing is trained when one fails)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from flowtrain.config import load_config
from flowtrain.errors import ConfigError, DataError
from flowtrain.train import preflight
from flowtrain.train.trainer import Trainer
from tests.conftest import tiny_overrides


@contextlib.contextmanager
def read_only_dir(tmp_path: Path):
    """A directory nobody may write in: a 0555 directory for a normal user; root ignores modes, so for root a
    read-only tmpfs, or /proc (which takes no new entries) where mounting is not allowed."""
    if os.geteuid() != 0:
        path = tmp_path / "ro"
        path.mkdir()
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    path = tmp_path / "ro"
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        yield Path("/proc")
        return
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_warmup_longer_than_the_run_is_shortened_to_a_tenth_of_it():
    cfg = load_config("default", ["train.max_steps=50", "schedule.warmup_steps=100"])
    assert preflight.shorten_warmup(cfg) == (
        "schedule.warmup_steps=100 is longer than train.max_steps=50; warming up for 5 steps (a tenth of the run) "
        "instead"
    )
    assert cfg.schedule.warmup_steps == 5
    assert (
        preflight.shorten_warmup(load_config("default", ["train.max_steps=100", "schedule.warmup_steps=100"])) is None
    )


def test_out_dir_must_be_a_writable_directory(tmp_path):
    preflight.check_writable(tmp_path / "new" / "runs")
    assert (tmp_path / "new" / "runs").is_dir() and not list((tmp_path / "new" / "runs").iterdir())
    afile = tmp_path / "afile"
    afile.write_text("x")
    for target in (afile, afile / "runs"):
        with pytest.raises(ConfigError, match=f"{afile} is a file, so the run cannot be written"):
            preflight.check_writable(target)
    with read_only_dir(tmp_path) as ro, pytest.raises(ConfigError, match=f"cannot write to {ro / 'runs'} .*writable"):
        preflight.check_writable(ro / "runs")


SCALE_1 = ["optim.adamw_lr_scale=1"]  # the default's AdamW-half scale is Muon's; another optimizer refuses it


def test_checkpoint_estimate_counts_weights_and_optimizer_moments():
    cfg = load_config("default", ["model.vocab_size=256"])
    weights, adam = preflight.checkpoint_bytes(cfg)
    from flowtrain.model.gpt import GPT

    params = sum(p.numel() for p in GPT(cfg.model).parameters())  # tied embeddings counted once
    assert weights == 4 * params and adam == 2 * weights
    assert (
        preflight.checkpoint_bytes(load_config("default", ["model.vocab_size=256", "optim.name=sgd", *SCALE_1]))[1]
        == weights
    )
    no_momentum = ["model.vocab_size=256", "optim.name=sgd", "optim.momentum=0", *SCALE_1]
    assert preflight.checkpoint_bytes(load_config("default", no_momentum))[1] == 0


def test_a_checkpoint_bigger_than_the_free_disk_is_refused_before_the_model_exists(small_text, tmp_path):
    # ~3.7 TB of weights and Adam moments: built on the meta device only, so this test allocates nothing
    huge = {
        "model.n_layer": 24,
        "model.n_embd": 32768,
        "model.n_head": 64,
        "optim.name": "adamw",
        "optim.adamw_lr_scale": 1,
    }
    cfg = load_config("default", tiny_overrides(small_text, tmp_path, **huge))
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(ConfigError) as info:
        Trainer(cfg)
    line = str(info.value)
    assert line.startswith(f"not enough free disk for a checkpoint under {tmp_path / 'runs'}: one needs about ")
    assert "TB (weights" in line and "adamw state" in line and "set train.out_dir to a larger disk" in line
    assert free < 3e12 and not (tmp_path / "runs" / "tiny").exists()


@pytest.mark.parametrize(
    "loader, block, split",
    [("random", 6000, "val"), ("packed", 6000, "val"), ("varlen", 6000, "val"), ("random", 60_000, "train")],
)
def test_a_block_longer_than_any_split_fails_before_step_one(small_text, tmp_path, loader, block, split):
    """The val split of 60 kB is 6000 tokens: a block that fits the train split but not val failed at the first
    evaluation, after training, before its checkpoint."""
    extra = {"model.block_size": block, "data.loader": loader, "model.n_layer": 1, "model.n_embd": 8}
    cfg = load_config("default", tiny_overrides(small_text, tmp_path, **extra))
    with pytest.raises(DataError) as info:
        Trainer(cfg)
    assert f"model.block_size={block} is longer than the {split} split (" in str(info.value)
    assert "lower model.block_size to at most" in str(info.value)
    assert not (tmp_path / "runs" / "tiny").exists()


@pytest.mark.parametrize("stop_after", [0, -1])
def test_stop_after_must_be_a_step_the_run_takes(small_text, tmp_path, stop_after):
    cfg = load_config("default", tiny_overrides(small_text, tmp_path))
    with pytest.raises(ConfigError, match=f"--stop-after {stop_after}: give the step to stop after, >= 1"):
        Trainer(cfg, stop_after=stop_after)
    with pytest.raises(ConfigError, match="already at step 10; give a later step"):
        preflight.check_stop_after(10, 10)
    assert not (tmp_path / "runs").exists()
