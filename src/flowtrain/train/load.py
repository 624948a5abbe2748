"""Load a trained model (weights + tokenizer + config) from a run directory or checkpoint, for sampling and
diagnosis. Only safetensors and JSON/YAML are read: nothing from the checkpoint can execute code."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from flowtrain.config import RunConfig, build_config, load_run_config, parse_yaml
from flowtrain.data.tokenizers import tokenizer_from_json
from flowtrain.errors import CheckpointError
from flowtrain.model.gpt import GPT
from flowtrain.rundir import RunDir
from flowtrain.train import checkpoint as ckpt


@dataclass
class LoadedModel:
    model: GPT
    tokenizer: object
    cfg: RunConfig
    checkpoint: ckpt.Checkpoint


def resolve_checkpoint(path: Path, which: str = "latest") -> Path:
    """A checkpoint directory from a run directory (`latest`, `best` or a step number) or a checkpoint path."""
    path = Path(path)
    if (path / "meta.json").is_file() or path.parent.name == "checkpoints":
        return path
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist; give a run directory or a checkpoints/step_N directory")
    found = ckpt.list_checkpoints(RunDir(path).checkpoints)
    if not found:
        raise CheckpointError(f"{path} has no complete checkpoint; train it first (or give another run directory)")
    if which == "latest":
        return found[-1][1]
    if which == "best":
        try:
            best = json.loads((found[-1][1] / "state.json").read_text(encoding="utf-8")).get("best_step")
        except (OSError, ValueError, AttributeError):
            raise CheckpointError(f"{found[-1][1]}/state.json is unreadable; give a step number instead") from None
        match = [p for s, p in found if s == best]
        return match[0] if match else found[-1][1]
    try:
        step = int(which)
    except ValueError:
        raise CheckpointError(f"checkpoint {which!r} is not latest, best or a step number") from None
    match = [p for s, p in found if s == step]
    if not match:
        raise CheckpointError(f"{path} has no checkpoint at step {step}; it has {[s for s, _ in found]}")
    return match[0]


def load_trained(path: Path, which: str = "latest", device: str | torch.device = "cpu") -> LoadedModel:
    return load_checkpoint(ckpt.read_checkpoint(resolve_checkpoint(path, which)), device)


def load_checkpoint(c: ckpt.Checkpoint, device: str | torch.device = "cpu") -> LoadedModel:
    """The model, tokenizer and config of a verified checkpoint (read_checkpoint's), in eval mode."""
    fix = "use another checkpoint (--checkpoint)"
    cfg = build_config(parse_yaml(c.config_yaml, f"{c.path}/config.yaml", fix))
    model = GPT(cfg.model)
    ckpt.restore_model(c, model)
    model.to(device).eval()
    return LoadedModel(model, tokenizer_from_json(c.tokenizer_json), cfg, c)


def config_for_resume(run_dir: Path, overrides: list[str]) -> RunConfig:
    """The resumed run's config: what the run directory says ran, with any overrides applied."""
    path = RunDir(Path(run_dir)).config
    if not path.is_file():
        raise CheckpointError(f"cannot resume {run_dir}: it has no config.yaml; is it a flowtrain run directory?")
    latest = ckpt.latest_checkpoint(RunDir(Path(run_dir)).checkpoints)
    return load_run_config(path, overrides, restore_from=latest / "config.yaml" if latest else None)
