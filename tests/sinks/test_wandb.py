"""wandb, when installed and asked for, in offline mode (no account, no network): a real offline run file."""

import pytest

from flowtrain.config import load_config
from flowtrain.train.trainer import Trainer
from tests.conftest import tiny_overrides


def test_offline_wandb_run_is_written(small_text, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is optional (pip install 'flowtrain[wandb]')")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(
        "default",
        tiny_overrides(small_text, tmp_path, **{"log.wandb": True, "train.max_steps": 6, "schedule.warmup_steps": 2}),
    )
    run_dir = Trainer(cfg).run_loop().run_dir
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1 and files[0].stat().st_size > 0


def test_wandb_missing_is_a_config_error(small_text, tmp_path, monkeypatch):
    import builtins

    from flowtrain.errors import ConfigError
    from flowtrain.sinks.wandb import WandbSink

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("no wandb")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(ConfigError, match="pip install wandb"):
        WandbSink("p", "offline", "r", str(tmp_path), {})
