"""Where model.init_from's weights come from: a transformers directory (GPT-2 or Llama layout) or a flowtrain run.

Weights are read with safetensors only (a directory with only pickled pytorch_model.bin files is refused, since
unpickling can run code); a sharded directory's model.safetensors.index.json is followed. A source says which
model it is (ModelConfig fields), how long its position table is, what tokenizer it brings (as a
data.tokenizer_path value) and, for a config that fits it, the state dict to load.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flowtrain.data.tokenizers import Tokenizer, load_tokenizer_file
from flowtrain.errors import CheckpointError, FlowtrainError, InteropError
from flowtrain.interop import weights
from flowtrain.interop.layouts import GPT2, read_hf_config
from flowtrain.model.config import ARCHITECTURE_FIELDS, ModelConfig
from flowtrain.model.gpt import GPT
from flowtrain.train import checkpoint as ckpt

Tensors = dict[str, torch.Tensor]


@dataclass
class Source:
    """A model to start from. `fields`: the ModelConfig fields it decides; `positions`: its context (the
    learned position table's length, or the longest context a RoPE model was made for); `bias_free`: it has
    no biases (or only zero ones), so a run may add them starting at zero; `tied`: head and embedding are one
    matrix, so a run may untie them (the head starting as a copy)."""

    path: Path
    description: str  # for messages: "transformers gpt2 directory runs/x", "flowtrain checkpoint ..."
    fields: dict[str, Any]
    positions: int
    tokenizer_path: Path
    tokenizer: Tokenizer
    bias_free: bool
    tied: bool
    _state: Callable[[ModelConfig], Tensors] = field(repr=False)

    def state_dict(self, cfg: ModelConfig) -> Tensors:
        """The weights for `cfg` (this source's architecture with the run's block_size and allowed choices),
        every name GPT(cfg).state_dict() has (a tied head under both of its names)."""
        state = self._state(cfg)
        if cfg.tie_embeddings:
            state["lm_head.weight"] = state["tok_emb.weight"]
        return state

    def load_into(self, model: GPT) -> None:
        """Copy the weights into a freshly built model of the run's config (strict: every tensor, no other)."""
        with torch.no_grad():
            model.load_state_dict(self.state_dict(model.cfg), strict=True)


def open_source(path: str | Path) -> Source:
    """A transformers directory (config.json) or a flowtrain run / checkpoint directory, opened and checked."""
    path = Path(path).expanduser()
    if (path / "config.json").is_file():
        return _transformers_source(path)
    if (path / "meta.json").is_file() or (path / "checkpoints").is_dir() or (path / "config.yaml").is_file():
        return _flowtrain_source(path)
    if not path.exists():
        raise InteropError(
            f"model.init_from={path} does not exist; give a transformers model directory or a flowtrain run directory"
        )
    raise InteropError(
        f"model.init_from={path} is neither a transformers model directory (it has no config.json) nor a flowtrain "
        "run or checkpoint directory; point it at one of those"
    )


# ---- transformers directory -----------------------------------------------------------------------------------
def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InteropError(f"{path}/config.json cannot be read ({exc}); re-save the model") from None
    if not isinstance(config, dict):
        raise InteropError(f"{path}/config.json is not a JSON object; re-save the model")
    return config


def weight_files(path: Path) -> list[Path]:
    """The safetensors files holding a transformers directory's weights; pickled-only directories are refused."""
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InteropError(f"{index} cannot be read ({exc}); re-save the model") from None
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise InteropError(
                f"{path} is missing {missing[0]}, a shard its model.safetensors.index.json lists; "
                "copy the whole directory"
            )
        return [path / n for n in names]
    if list(path.glob("pytorch_model*.bin")) or list(path.glob("*.pt")) or list(path.glob("*.pth")):
        raise InteropError(
            f"{path} holds its weights only as pickle (pytorch_model.bin), which flowtrain never loads (unpickling "
            "can run code); re-save them with safetensors: model.save_pretrained(DIR, safe_serialization=True)"
        )
    raise InteropError(f"{path} has no model.safetensors; save the model there with save_pretrained")


def _load_tensors(files: list[Path]) -> Tensors:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors: Tensors = {}
    for file in files:
        try:
            tensors.update(load_file(str(file), device="cpu"))
        except (SafetensorError, OSError) as exc:
            raise InteropError(f"{file} cannot be read ({exc}); re-save the model") from None
    return tensors


def _transformers_source(path: Path) -> Source:
    try:
        imported = read_hf_config(_read_config(path), str(path))
    except (TypeError, ValueError, AttributeError) as exc:  # a number that is text, a list that is a number...
        raise InteropError(f"cannot import {path}: its config.json has a value of the wrong type ({exc})") from None
    _buildable(imported.fields, imported.positions, path)
    tensors = weights.normalise_names(_load_tensors(weight_files(path)), imported.layout)
    fields = dict(imported.fields)
    if imported.layout == GPT2:
        fields["bias"] = not weights.biases_all_zero(tensors)  # GPT-2 stores absent biases as zeros
    try:
        tokenizer = load_tokenizer_file(str(path))
    except FlowtrainError as exc:
        raise InteropError(f"model.init_from={path}: {exc}") from None
    _check_vocab(fields["vocab_size"], tokenizer, path)

    def state(cfg: ModelConfig) -> Tensors:
        return weights.from_hf(
            tensors,
            cfg,
            imported.layout,
            str(path),
            positions=imported.positions,
            tied=imported.fields["tie_embeddings"],
        )

    return Source(
        path,
        f"transformers {imported.layout} directory {path}",
        fields,
        imported.positions,
        path,
        tokenizer,
        bias_free=not fields["bias"],
        tied=fields["tie_embeddings"],
        _state=state,
    )


def _buildable(fields: dict[str, Any], positions: int, path: Path) -> None:
    """The config.json's numbers make a ModelConfig (types, ranges, n_embd a multiple of n_head, ...)."""
    from pydantic import ValidationError

    try:
        ModelConfig(**fields, block_size=positions)
    except (ValidationError, TypeError) as exc:
        error = exc.errors()[0] if isinstance(exc, ValidationError) else {"msg": str(exc), "loc": ()}
        where = ".".join(str(p) for p in error["loc"])
        raise InteropError(
            f"cannot import {path}: its config.json gives no model flowtrain can build "
            f"({where + ': ' if where else ''}{error['msg'].removeprefix('Value error, ')})"
        ) from None


def _check_vocab(rows: int, tokenizer: Tokenizer, path: Path) -> None:
    if rows < tokenizer.vocab_size:
        raise InteropError(
            f"cannot import {path}: its tokenizer has {tokenizer.vocab_size} tokens but its embedding "
            f"only {rows} rows; give a directory whose tokenizer fits its model"
        )


# ---- flowtrain run ----------------------------------------------------------------------------------------------
def pick_checkpoint(path: Path, which: str = "latest") -> ckpt.Checkpoint:
    """A run's newest usable checkpoint (skipping damaged newer ones, with a notice), or the one `which` names
    (best, a step number), or the checkpoint directory `path` is."""
    from flowtrain.train.load import resolve_checkpoint
    from flowtrain.train.run_files import resume_point

    if which == "latest" and path.parent.name != "checkpoints":
        if not path.is_dir():
            raise CheckpointError(f"{path} does not exist; give a run directory or a checkpoints/step_N directory")
        chosen = resume_point(path)  # a damaged newer checkpoint is skipped with a notice
        if chosen is None:
            raise CheckpointError(f"{path} has no checkpoint yet; train it first (or give another run directory)")
        return chosen
    return ckpt.read_checkpoint(resolve_checkpoint(path, which))


def _flowtrain_source(path: Path) -> Source:
    from flowtrain.train.load import load_checkpoint

    try:
        loaded = load_checkpoint(pick_checkpoint(path))
    except FlowtrainError as exc:
        raise InteropError(f"model.init_from={path}: {exc}") from None
    own, state = loaded.cfg.model, loaded.model.state_dict()
    fields = {name: getattr(own, name) for name in ARCHITECTURE_FIELDS}
    tokenizer_path = loaded.checkpoint.path / "tokenizer.json"

    def fit(cfg: ModelConfig) -> Tensors:
        """The checkpoint's weights, with the run's shorter position table, added zero biases, untied head."""
        with torch.device("meta"):
            wanted = GPT(cfg).state_dict()
        out = {}
        for name, like in wanted.items():
            if name == "lm_head.weight":
                out[name] = state["tok_emb.weight"].clone() if own.tie_embeddings else state[name]
            elif name == "pos_emb.weight":
                out[name] = state[name][: like.shape[0]]
            else:  # a bias the source has none of starts at zero
                out[name] = state[name] if name in state else torch.zeros(like.shape)
        return out

    return Source(
        path,
        f"flowtrain checkpoint {loaded.checkpoint.path}",
        fields,
        own.block_size,
        tokenizer_path,
        loaded.tokenizer,
        bias_free=not own.bias,
        tied=own.tie_embeddings,
        _state=fit,
    )
