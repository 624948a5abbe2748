"""Checkpoints that are safe to load and impossible to mistake for complete when they are not.

Layout of `checkpoints/step_000500/`:

    model.safetensors      weights (safetensors: no code execution on load; tied weights stored once)
    optimizer.pt           optimizer state_dict (tensors and numbers only; loaded with weights_only=True)
    rng.safetensors        torch RNG states (uint8 tensors)
    state.json             step, scheduler, loader, clipper and trainer state (plain JSON)
    tokenizer.json         the tokenizer the model was trained with
    config.yaml            the resolved run config
    meta.json              written last: format version, layout, step, and the sha256 of every file above

Layout "sharded" (train.checkpoint_format=sharded, for FSDP models too big to gather on one rank) replaces
model.safetensors and optimizer.pt by `dcp/`, a torch.distributed.checkpoint directory written by every rank;
it loads on any world size (DCP reshards). Its pickled parts are vetted first (checkpoint_dcp.py).

Under DDP/FSDP every rank calls `save_checkpoint` (gathering is collective); rank 0 writes and renames, then a
barrier, so nobody moves on before the checkpoint exists.

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
from flowtrain.train import distributed as dist_util
from flowtrain.train.checkpoint_dcp import load_sharded, save_sharded
from flowtrain.train.checkpoint_space import full_disk_reported

try:
    from torch.distributed.tensor import DTensor
except Exception:  # pragma: no cover - builds without distributed
    DTensor = None  # type: ignore[assignment,misc]

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
    layout: str = "full"


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
    layout: str = "full",
) -> Path:
    """Write checkpoint `step` atomically and return its directory. Under DDP/FSDP every rank must call it."""
    final = step_dir(checkpoints, step)
    target = _unwrap(model)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    is_main = not distributed or torch.distributed.get_rank() == 0
    small = (step, rng, state, tokenizer_json, config_yaml)

    def _full_disk_reported():  # the message says whether earlier checkpoints are there to resume from
        return full_disk_reported(final, target, optimizer, lambda: bool(list_checkpoints(checkpoints)))

    if layout == "sharded":
        with _full_disk_reported():
            save_sharded(final, target, optimizer, lambda tmp: _write_small(tmp, *small, layout="sharded"), is_main)
    elif _is_sharded(target):  # FSDP, gathered to rank 0 (collective), written as one file like any other
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(target, options=opts)
        optim_state = _fqn_to_index(get_optimizer_state_dict(target, optimizer, options=opts))
        if is_main:
            with _full_disk_reported(), atomic_directory(final) as tmp:
                save_file(_dedup_tied(target, model_state), str(tmp / "model.safetensors"))
                torch.save(optim_state, tmp / "optimizer.pt")
                _write_small(tmp, *small, layout="full")
    elif is_main:
        with _full_disk_reported(), atomic_directory(final) as tmp:
            save_model(target, str(tmp / "model.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            _write_small(tmp, *small, layout="full")
    dist_util.barrier()
    return final


def _write_small(tmp: Path, step: int, rng, state, tokenizer_json: str, config_yaml: str, layout: str) -> None:
    """Everything but the tensors of model and optimizer, then meta.json (last) with every file's hash."""
    save_file({k: v.contiguous() for k, v in rng.items()}, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=1))
    (tmp / "tokenizer.json").write_text(tokenizer_json)
    (tmp / "config.yaml").write_text(config_yaml)
    files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    meta = {
        "format_version": FORMAT_VERSION,
        "flowtrain_version": __version__,
        "step": step,
        "layout": layout,
        "complete": True,
        "sha256": {name: sha256_file(tmp / name) for name in files},
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))


def _is_sharded(model: torch.nn.Module) -> bool:
    return DTensor is not None and any(isinstance(p, DTensor) for p in model.parameters())


def _tied_groups(model: torch.nn.Module) -> list[list[str]]:
    """Names that share one parameter (tied embeddings), each group sorted."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [sorted(names) for names in by_id.values() if len(names) > 1]


def _dedup_tied(model: torch.nn.Module, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Store a tied weight once, under the name safetensors' save_model keeps (the first in sorted order)."""
    out = {k: v.contiguous() for k, v in full.items()}
    for names in _tied_groups(model):
        for extra in names[1:]:
            out.pop(extra, None)
    return out


def _fqn_to_index(osd: dict[str, Any]) -> dict[str, Any]:
    """A full optimizer state dict keyed by parameter names → torch's own index-keyed format (the same file a
    single process writes), numbering parameters in param-group order as Optimizer.state_dict does."""
    if not osd:
        return {}
    index: dict[str, int] = {}
    groups = []
    for group in osd["param_groups"]:
        ids = []
        for fqn in group["params"]:
            index.setdefault(fqn, len(index))
            ids.append(index[fqn])
        groups.append({**group, "params": ids})
    return {"state": {index[k]: v for k, v in osd["state"].items()}, "param_groups": groups}


def _index_to_fqn(saved: dict[str, Any], template: dict[str, Any]) -> dict[str, Any]:
    names = [fqn for group in template["param_groups"] for fqn in group["params"]]
    groups = []
    offset = 0
    for group, live in zip(saved["param_groups"], template["param_groups"], strict=True):
        groups.append({**group, "params": names[offset : offset + len(live["params"])]})
        offset += len(live["params"])
    return {"state": {names[int(k)]: v for k, v in saved["state"].items()}, "param_groups": groups}


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module behind torch.compile / DDP wrappers, so parameter names stay stable."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model) if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def checkpoint_dirs(checkpoints: Path) -> list[tuple[int, Path]]:
    """Every checkpoints/step_N directory, complete or not, oldest first (temporaries are hidden names)."""
    found = []
    if Path(checkpoints).is_dir():
        for child in Path(checkpoints).iterdir():
            m = _STEP_DIR.match(child.name)
            if m and child.is_dir():
                found.append((int(m.group(1)), child))
    return sorted(found)


def list_checkpoints(checkpoints: Path) -> list[tuple[int, Path]]:
    """Complete-looking checkpoints (those with a meta.json), oldest first."""
    return [(step, path) for step, path in checkpoint_dirs(checkpoints) if (path / "meta.json").is_file()]


def latest_checkpoint(checkpoints: Path) -> Path | None:
    found = list_checkpoints(checkpoints)
    return found[-1][1] if found else None


def prune_checkpoints(checkpoints: Path, keep_last: int, keep_steps: set[int]) -> None:
    """Delete all but the newest `keep_last` checkpoints and those in `keep_steps` (the best one)."""
    found = list_checkpoints(checkpoints)
    for step, path in found[: max(0, len(found) - keep_last)]:
        if step not in keep_steps:
            shutil.rmtree(path, ignore_errors=True)


class UnusableCheckpoint(CheckpointError):
    """A checkpoint that is incomplete or corrupt; `problem` says what, in a few words."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"checkpoint {path} {problem}; resume from an earlier checkpoint")
        self.problem = problem


def read_checkpoint(path: Path) -> Checkpoint:
    """Verify a checkpoint directory (complete, uncorrupted) and read its small parts."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; point at a run directory or checkpoints/step_N")
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise UnusableCheckpoint(path, "is incomplete (no meta.json)")
    try:
        meta = json.loads(meta_path.read_text())
        hashes = dict(meta["sha256"])
        step = int(meta["step"])
    except (ValueError, KeyError, TypeError):  # UnicodeDecodeError is a ValueError
        raise UnusableCheckpoint(path, "has a corrupt meta.json") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {meta.get('format_version')}, this flowtrain reads "
            f"{FORMAT_VERSION}; use the flowtrain version that wrote it"
        )
    for name, digest in hashes.items():
        file = path / name
        if not file.is_file():
            raise UnusableCheckpoint(path, f"is missing {name}")
        if sha256_file(file) != digest:
            raise UnusableCheckpoint(path, f"has a truncated or corrupt {name} (checksum mismatch)")
    try:
        state = json.loads((path / "state.json").read_text())
        tokenizer_json = (path / "tokenizer.json").read_text()
        config_yaml = (path / "config.yaml").read_text()
    except (OSError, ValueError) as exc:
        raise UnusableCheckpoint(path, f"cannot be read ({exc})") from None
    layout = meta.get("layout", "full")
    if layout not in ("full", "sharded"):
        raise CheckpointError(
            f"checkpoint {path} has unknown layout {layout!r}; use the flowtrain version that wrote it"
        )
    return Checkpoint(path, step, state, tokenizer_json, config_yaml, layout)


def restore_model(ckpt: Checkpoint, model: torch.nn.Module) -> None:
    """Load weights, refusing a checkpoint of another shape with a message that names the first mismatch.

    Works for plain, DDP and FSDP models (FSDP: every rank reads the file and keeps its shard) and for both
    layouts. Under DDP/FSDP every rank must call it.
    """
    target = _unwrap(model)
    if ckpt.layout == "sharded":
        load_sharded(ckpt, target, None)
        return
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
    if _is_sharded(target):
        _set_full_model_state(ckpt, target, saved)
        return
    try:
        missing, unexpected = load_model(target, str(ckpt.path / "model.safetensors"), strict=False)
    except (SafetensorError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {ckpt.path} does not fit this model ({str(exc).splitlines()[0]})") from None
    if missing or unexpected:
        _mismatch(ckpt, list(missing), list(unexpected))


def _mismatch(ckpt: Checkpoint, missing: list[str], unexpected: list[str]) -> None:
    names = ", ".join(missing[:2] + unexpected[:2])
    raise CheckpointError(
        f"checkpoint {ckpt.path} is from a different model architecture (mismatched tensors: {names}); "
        "use the run's own config"
    )


def _set_full_model_state(ckpt: Checkpoint, model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """A full (consolidated) state dict into an FSDP model: tied names filled in, then torch shards it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    for names in _tied_groups(model):
        present = next((n for n in names if n in saved), None)
        for n in names:
            if present is not None and n not in saved:
                saved[n] = saved[present]
    own = set(model.state_dict())
    missing, unexpected = sorted(own - set(saved)), sorted(set(saved) - own)
    if missing or unexpected:
        _mismatch(ckpt, missing, unexpected)
    set_model_state_dict(model, saved, options=StateDictOptions(full_state_dict=True))


def restore_optimizer(ckpt: Checkpoint, optimizer: torch.optim.Optimizer, model: torch.nn.Module | None = None) -> None:
    """Optimizer state; `model` is needed for FSDP models and sharded checkpoints (names ↔ parameters)."""
    target = _unwrap(model) if model is not None else None
    try:
        if ckpt.layout == "sharded":
            if target is None:
                raise ValueError("a sharded checkpoint needs the model to restore the optimizer")
            load_sharded(ckpt, target, optimizer)
            return
        state = torch.load(ckpt.path / "optimizer.pt", map_location="cpu", weights_only=True)
        if target is not None and _is_sharded(target):
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_optimizer_state_dict,
                set_optimizer_state_dict,
            )

            named = _index_to_fqn(state, get_optimizer_state_dict(target, optimizer))
            set_optimizer_state_dict(target, optimizer, named, options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state)
    except CheckpointError:
        raise
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
