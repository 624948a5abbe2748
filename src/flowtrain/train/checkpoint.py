"""Checkpoints that are safe to load and impossible to mistake for complete when they are not.

Layout of `checkpoints/step_000500/`:

    model.safetensors      weights (safetensors: no code execution on load; tied weights stored once)
    optimizer.pt           optimizer state_dict (tensors and numbers only; loaded with weights_only=True)
    rng.safetensors        torch RNG states (uint8 tensors)
    state.json             step, scheduler, loader, clipper and trainer state (plain JSON)
    tokenizer.json         the tokenizer the model was trained with
    config.yaml            the resolved run config
    meta.json              written last: format version, step, and the sha256 of every file above

The directory is built under a temporary name and renamed into place (fsutil.atomic_directory), so a crash
leaves either nothing or a complete checkpoint; `meta.json`'s hashes catch later truncation or corruption.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from flowtrain import __version__
from flowtrain.errors import CheckpointError
from flowtrain.fsutil import atomic_directory, sha256_file

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class Checkpoint:
    """What a checkpoint holds once verified; tensors are loaded into live objects by `restore_*`."""

    path: Path
    step: int
    state: dict[str, Any]
    tokenizer_json: str
    config_yaml: str


def step_dir(checkpoints: Path, step: int) -> Path:
    return Path(checkpoints) / f"step_{step:06d}"


def save_checkpoint(
    checkpoints: Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rng: dict[str, torch.Tensor],
    state: dict[str, Any],
    tokenizer_json: str,
    config_yaml: str,
) -> Path:
    """Write checkpoint `step` atomically and return its directory."""
    final = step_dir(checkpoints, step)
    with atomic_directory(final) as tmp:
        save_model(_unwrap(model), str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        save_file({k: v.contiguous() for k, v in rng.items()}, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=1))
        (tmp / "tokenizer.json").write_text(tokenizer_json)
        (tmp / "config.yaml").write_text(config_yaml)
        files = sorted(p.name for p in tmp.iterdir())
        meta = {
            "format_version": FORMAT_VERSION,
            "flowtrain_version": __version__,
            "step": step,
            "complete": True,
            "sha256": {name: sha256_file(tmp / name) for name in files},
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    return final


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module behind torch.compile / DDP wrappers, so parameter names stay stable."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model) if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def list_checkpoints(checkpoints: Path) -> list[tuple[int, Path]]:
    """Complete-looking checkpoints (those with a meta.json), oldest first."""
    found = []
    if Path(checkpoints).is_dir():
        for child in Path(checkpoints).iterdir():
            m = _STEP_DIR.match(child.name)
            if m and (child / "meta.json").is_file():
                found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(checkpoints: Path) -> Path | None:
    found = list_checkpoints(checkpoints)
    return found[-1][1] if found else None


def prune_checkpoints(checkpoints: Path, keep_last: int, keep_steps: set[int]) -> None:
    """Delete all but the newest `keep_last` checkpoints and those in `keep_steps` (the best one)."""
    found = list_checkpoints(checkpoints)
    for step, path in found[: max(0, len(found) - keep_last)]:
        if step not in keep_steps:
            shutil.rmtree(path, ignore_errors=True)


def read_checkpoint(path: Path) -> Checkpoint:
    """Verify a checkpoint directory (complete, uncorrupted) and read its small parts."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; point at a run directory or checkpoints/step_N")
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete (no meta.json); resume from an earlier checkpoint")
    try:
        meta = json.loads(meta_path.read_text())
        hashes = meta["sha256"]
        step = int(meta["step"])
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint {path} has a corrupt meta.json; resume from an earlier checkpoint") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {meta.get('format_version')}, this flowtrain reads "
            f"{FORMAT_VERSION}; use the flowtrain version that wrote it"
        )
    for name, digest in hashes.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is missing {name}; resume from an earlier checkpoint")
        if sha256_file(file) != digest:
            raise CheckpointError(
                f"checkpoint {path}: {name} is truncated or corrupt (checksum mismatch); "
                "resume from an earlier checkpoint"
            )
    try:
        state = json.loads((path / "state.json").read_text())
        tokenizer_json = (path / "tokenizer.json").read_text()
        config_yaml = (path / "config.yaml").read_text()
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read ({exc}); resume from an earlier checkpoint") from None
    return Checkpoint(path, step, state, tokenizer_json, config_yaml)


def restore_model(ckpt: Checkpoint, model: torch.nn.Module) -> None:
    """Load weights, refusing a checkpoint of another shape with a message that names the first mismatch."""
    target = _unwrap(model)
    try:
        saved = load_file(str(ckpt.path / "model.safetensors"), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"checkpoint {ckpt.path}: model.safetensors cannot be read ({exc})") from None
    own = target.state_dict()
    for name, tensor in own.items():
        if name in saved and saved[name].shape != tensor.shape:
            raise CheckpointError(
                f"checkpoint {ckpt.path} is from a different model shape: {name} is "
                f"{list(saved[name].shape)} there but {list(tensor.shape)} in this config; "
                "use the run's own config (or matching model.* overrides)"
            )
    try:
        missing, unexpected = load_model(target, str(ckpt.path / "model.safetensors"), strict=False)
    except (SafetensorError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {ckpt.path} does not fit this model ({str(exc).splitlines()[0]})") from None
    if missing or unexpected:
        names = ", ".join(list(missing)[:2] + list(unexpected)[:2])
        raise CheckpointError(
            f"checkpoint {ckpt.path} is from a different model architecture (mismatched tensors: {names}); "
            "use the run's own config"
        )


def restore_optimizer(ckpt: Checkpoint, optimizer: torch.optim.Optimizer) -> None:
    try:
        state = torch.load(ckpt.path / "optimizer.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state)
    except Exception as exc:  # weights_only unpickler errors vary by torch version
        raise CheckpointError(
            f"checkpoint {ckpt.path}: optimizer state cannot be loaded ({str(exc).splitlines()[0]}); "
            "was it written for another optimizer? set optim.name to the run's"
        ) from None


def restore_rng(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(ckpt.path / "rng.safetensors"))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"checkpoint {ckpt.path}: rng.safetensors cannot be read ({exc})") from None
