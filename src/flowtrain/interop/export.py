"""`flowtrain export RUN -o DIR`: a run's checkpoint as a Hugging Face transformers model directory.

    DIR/
      config.json              GPT2LMHeadModel or LlamaForCausalLM (interop/layouts.py), float32
      generation_config.json   bos = eos = flowtrain's end-of-text token, and the padding token
      model.safetensors        the weights under transformers' names (interop/weights.py)
      tokenizer.json           BPE: the run's own file; char and byte: their equivalents (data/hf_tokenizers.py)
      tokenizer_config.json, special_tokens_map.json   for AutoTokenizer: PreTrainedTokenizerFast, its specials

Nothing here needs transformers. The directory is built under a temporary name and renamed into place
(fsutil.atomic_directory), after the layout check and, with verify, after transformers' own forward pass
agreed with flowtrain's: a refused or failed export leaves nothing at DIR.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flowtrain.data.hf_tokenizers import hf_tokenizer_json
from flowtrain.data.tokenizers import Tokenizer
from flowtrain.errors import InteropError
from flowtrain.fsutil import atomic_directory
from flowtrain.interop.layouts import ARCHITECTURES, Specials, dropped_settings, hf_config, layout_of
from flowtrain.interop.source import pick_checkpoint
from flowtrain.interop.weights import to_hf

EXPORT_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
)


@dataclass
class Exported:
    out: Path
    checkpoint: Path
    architecture: str  # GPT2LMHeadModel / LlamaForCausalLM
    max_logit_diff: float | None = None  # with verify: transformers' logits against flowtrain's


def _refuse_foreign(out: Path) -> None:
    """An existing DIR is replaced, so it must be absent, empty, or an export (only the files one writes)."""
    if out.exists() and (not out.is_dir() or any(p.name not in EXPORT_FILES for p in out.iterdir())):
        raise InteropError(f"{out} exists and is not an exported model directory; choose a new -o DIR")


def tokenizer_files(tokenizer: Tokenizer, block_size: int) -> dict[str, str]:
    """tokenizer.json and what AutoTokenizer reads beside it. flowtrain's end-of-text token opens and closes
    documents, so it is bos and eos; without a padding token of its own, padding is end-of-text too."""
    specials = {
        "bos_token": tokenizer.eot_text,
        "eos_token": tokenizer.eot_text,
        "pad_token": tokenizer.pad_text or tokenizer.eot_text,
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "model_max_length": block_size,
        "clean_up_tokenization_spaces": False,  # decode returns exactly what flowtrain's decode does
    }
    return {
        "tokenizer.json": hf_tokenizer_json(tokenizer),
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
        "special_tokens_map.json": json.dumps(specials, indent=2, ensure_ascii=False) + "\n",
    }


def export_run(
    run: Path, out: Path, which: str = "latest", *, verify: bool = False, notice: Callable[[str], None] = print
) -> Exported:
    """Write `run`'s checkpoint (`which`: latest usable, best, a step number; or `run` is a checkpoint
    directory) as a transformers directory at `out`. `notice` hears of training-only settings left behind."""
    from safetensors.torch import save_file

    from flowtrain.train.load import load_checkpoint

    run, out = Path(run), Path(out)
    _refuse_foreign(out)
    loaded = load_checkpoint(pick_checkpoint(run, which))
    model_cfg, tokenizer = loaded.cfg.model, loaded.tokenizer
    layout = layout_of(model_cfg)  # refuses before anything is written
    bad = next((name for name, p in loaded.model.named_parameters() if not p.isfinite().all()), None)
    if bad is not None:
        raise InteropError(
            f"checkpoint {loaded.checkpoint.path} has non-finite weights ({bad}: the run diverged); "
            "export an earlier checkpoint with --checkpoint STEP"
        )
    for setting in dropped_settings(model_cfg, layout):
        notice(f"{setting} is not carried over: {ARCHITECTURES[layout]} has no such dropout (it only shapes training)")
    specials = Specials(tokenizer.eot_id, tokenizer.pad_id)
    config = hf_config(model_cfg, layout, specials)
    generation = {
        "bos_token_id": tokenizer.eot_id,
        "eos_token_id": tokenizer.eot_id,
        "pad_token_id": config["pad_token_id"],
    }
    result = Exported(out, loaded.checkpoint.path, ARCHITECTURES[layout])
    with atomic_directory(out) as tmp:
        save_file(
            to_hf(loaded.model.state_dict(), model_cfg, layout),
            str(tmp / "model.safetensors"),
            metadata={"format": "pt"},
        )
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        for name, text in tokenizer_files(tokenizer, model_cfg.block_size).items():
            (tmp / name).write_text(text, encoding="utf-8")
        if verify:
            from flowtrain.interop.verify import compare_logits

            result.max_logit_diff = compare_logits(loaded.model, tmp)
    return result
