"""model.init_from: a run starts from another model's weights and tokenizer (docs/interop.md).

The source decides the architecture (model.ARCHITECTURE_FIELDS) and the tokenizer (data.tokenizer_path), so
the data is tokenized as the model was trained. A setting the user gave that disagrees is an error naming
both values, except where the run's choice keeps the source's function: a shorter block_size (the position
table is cut), bias=true on a model without biases (they start at zero), tie_embeddings=false on a tied
model (the head starts as a copy). The config that results is the run's config.yaml, so a resumed run
builds the same model without reading the source's weights again (its weights come from its checkpoint); the
source's tokenizer file stays data.tokenizer_path, read again like data.sources (it keys the data cache).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from flowtrain.config import RunConfig
from flowtrain.data.tokenizers import load_tokenizer_file
from flowtrain.errors import ConfigError, DataError
from flowtrain.interop.source import Source, open_source
from flowtrain.model.config import ModelConfig


def _shown(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def init_source(cfg: RunConfig) -> Source | None:
    """The source of cfg.model.init_from (None without one), its model and tokenizer made the run's: cfg is
    changed in place, and the weights are Source.load_into's once the model is built."""
    return take_from_source(cfg) if cfg.model.init_from else None


def take_from_source(cfg: RunConfig) -> Source:
    """Open cfg.model.init_from and make the run's model and tokenizer its own (cfg is changed in place)."""
    source = open_source(cfg.model.init_from)
    model, given = cfg.model, cfg.model.model_fields_set

    def conflict(option: str, ours: Any, theirs: Any, fix: str = "") -> ConfigError:
        return ConfigError(
            f"model.{option}={_shown(ours)} conflicts with model.init_from: the {source.description} has "
            f"{option}={_shown(theirs)}; {fix or f'drop model.{option} (the source decides it)'}"
        )

    update = dict(source.fields)
    for name, theirs in source.fields.items():
        ours = getattr(model, name)
        if name not in given or ours == theirs or name in ("mlp_ratio", "mlp_hidden"):
            continue
        if name == "rope_theta" and source.fields["pos_encoding"] != "rope":
            continue  # unused by the source's model
        if (name == "bias" and ours and source.bias_free) or (name == "tie_embeddings" and not ours and source.tied):
            update[name] = ours  # the same function to start with: zero biases, a head that is a copy
            continue
        raise conflict(name, ours, theirs)
    if {"mlp_ratio", "mlp_hidden"} & given:  # compare widths: the source's ratio may be spelled another way
        asked = ModelConfig.model_validate({**model.model_dump(), "activation": source.fields["activation"]})
        wanted = ModelConfig.model_validate({**model.model_dump(), **source.fields})
        if asked.ffn_hidden != wanted.ffn_hidden:
            option = "mlp_hidden" if "mlp_hidden" in given else "mlp_ratio"
            raise conflict(
                option,
                getattr(model, option),
                f"an FFN width of {wanted.ffn_hidden}",
                f"drop model.{option} (the source decides the FFN width: {asked.ffn_hidden} here)",
            )
    if "block_size" not in given:
        update["block_size"] = source.positions
    elif source.fields["pos_encoding"] == "learned" and model.block_size > source.positions:
        raise conflict(
            "block_size",
            model.block_size,
            source.positions,
            f"learned positions stop there: set model.block_size <= {source.positions} or drop it",
        )
    try:
        cfg.model = ModelConfig.model_validate({**model.model_dump(), **update})
    except ValidationError as exc:  # the run's own settings with the source's shape (block_size vs RoPE, ...)
        msg = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise ConfigError(
            f"model.init_from={model.init_from}: the run's model settings do not fit its model ({msg})"
        ) from None
    _take_tokenizer(cfg, source)
    return source


def _take_tokenizer(cfg: RunConfig, source: Source) -> None:
    """data.tokenizer_path becomes the source's; one given that is another tokenizer is an error, and so is a
    prepared dataset (data.dataset) tokenized with another."""
    data = cfg.data
    if data.tokenizer_path and "tokenizer_path" in data.model_fields_set:
        given = load_tokenizer_file(data.tokenizer_path)
        if given.fingerprint != source.tokenizer.fingerprint:
            raise ConfigError(
                f"data.tokenizer_path={data.tokenizer_path} conflicts with model.init_from: the {source.description} "
                f"brings its own tokenizer ({source.tokenizer_path}); drop data.tokenizer_path"
            )
    if data.dataset:
        from flowtrain.data.dataset import TokenDataset

        if TokenDataset.open(data.dataset).tokenizer.fingerprint != source.tokenizer.fingerprint:
            raise DataError(
                f"data.dataset={data.dataset} was tokenized with another tokenizer than model.init_from's "
                f"({source.description}); prepare it with data.tokenizer_path={source.tokenizer_path}, or drop "
                "data.dataset"
            )
    data.tokenizer_path = str(source.tokenizer_path)
