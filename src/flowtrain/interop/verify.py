"""`flowtrain export --verify`: transformers loads the written directory and computes logits on the same tokens
as flowtrain's model; they must agree to float32 rounding. The one place flowtrain uses transformers, so it
is imported here only, and its absence is a one-line error."""

from __future__ import annotations

from pathlib import Path

import torch

from flowtrain.errors import InteropError
from flowtrain.model.gpt import GPT

SEQ_LEN = 64  # tokens compared (fewer when the context is shorter)


def compare_logits(model: GPT, directory: Path, seed: int = 0) -> float:
    """The largest |logit difference| between `model` and transformers' model of `directory` on a seeded
    random sequence; an InteropError when it exceeds 1e-4 of the logits' scale (a bug: please report it)."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise InteropError("flowtrain export --verify needs transformers: pip install transformers") from None
    try:
        theirs = AutoModelForCausalLM.from_pretrained(str(directory)).eval()  # float32: what config.json says
    except Exception as exc:  # whatever transformers raises: the export is not usable there, so it is not written
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InteropError(
            f"transformers cannot load the exported model ({first}); nothing was written: please report it "
            "with the run's config.yaml and your transformers version"
        ) from None
    n = min(SEQ_LEN, model.cfg.block_size)
    ids = torch.randint(0, model.cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ours = model(ids.to(next(model.parameters()).device)).float().cpu()
            other = theirs(input_ids=ids).logits.float()
    finally:
        model.train(was_training)
    diff = float((ours - other).abs().max())
    if not diff <= 1e-4 * max(1.0, float(ours.abs().max())):
        raise InteropError(
            f"transformers computes other logits from the exported model than flowtrain (max difference {diff:.3g}); "
            "nothing was written: this is a flowtrain bug, please report it with the run's config.yaml"
        )
    return diff
