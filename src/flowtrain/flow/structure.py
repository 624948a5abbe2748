"""A model's structure as the microscope sees it: the repeated blocks whose inputs and outputs form the residual
stream, the head that produces the logits, and the layer each parameter belongs to.

Found by itself on common architectures, or given (docs/flow.md, "Which model structure"):

* blocks: `model.blocks` (flowtrain's GPT), else the largest ModuleList/Sequential whose modules are structurally
  identical (same class, same parameter names and shapes): GPT-2 and nanoGPT `transformer.h`, Llama, Mistral and
  Qwen `model.layers`, GPT-NeoX `gpt_neox.layers`, ViT `vit.encoder.layer`. "Largest" is by parameter count;
* head: `model.lm_head`, else the one module named `lm_head` inside it, else what `model.get_output_embeddings()`
  returns (transformers' convention);
* layers: a parameter inside a block belongs to the block's path (`transformer.h.3`); any other to the module
  beside the blocks' container or one of its ancestors that holds it (`transformer.wte`, `transformer.ln_f`,
  `lm_head`). A model with its own `layer_of(name)` (flowtrain's GPT: embedding, block.i, head) is asked instead.

What the microscope cannot measure on a model is listed with the reason (`unavailable`), never reported as a number.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence

from torch import nn

from flowtrain.errors import StructureError
from flowtrain.flow.records import DEPTH_STATS
from flowtrain.model.layers import Attend

LOGIT_STATS = ("logits_max_abs", "logits_lse_mean")
BlocksSpec = str | Sequence[nn.Module] | Sequence[str] | nn.Module | None


def _signature(module: nn.Module) -> tuple:
    return type(module), tuple((n, tuple(p.shape)) for n, p in module.named_parameters())


def find_blocks(model: nn.Module) -> tuple[str, list[nn.Module]] | None:
    """(container path, its blocks) of the largest ModuleList/Sequential of structurally identical modules with
    parameters, or None."""
    best, best_key = None, None
    for path, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or not len(module):
            continue
        children = list(module)
        first = _signature(children[0])
        if not first[1] or any(_signature(c) != first for c in children[1:]):
            continue
        key = (sum(p.numel() for p in module.parameters()), len(children))
        if best_key is None or key > best_key:  # the first one found wins a tie
            best, best_key = (path, children), key
    return best


def _module_at(model: nn.Module, path: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        near = difflib.get_close_matches(path, names, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise StructureError(f"{what}={path!r}: {type(model).__name__} has no module at that path{hint}") from None


def resolve_blocks(model: nn.Module, blocks: BlocksSpec) -> list[nn.Module]:
    """The blocks as modules: given (modules, a container's path, or a list of module paths) or found."""
    if blocks is None:
        own = getattr(model, "blocks", None)
        if isinstance(own, (nn.ModuleList, nn.Sequential)) and len(own):
            return list(own)
        found = find_blocks(model)
        return found[1] if found is not None else []
    if isinstance(blocks, str):
        blocks = _module_at(model, blocks, "blocks")
        if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
            raise StructureError(
                f"blocks= names a {type(blocks).__name__}, not a ModuleList or Sequential of blocks; pass that "
                "container's path, or a list of the blocks' paths"
            )
    if isinstance(blocks, nn.Module) and not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        raise StructureError("blocks= takes a ModuleList/Sequential, a list of modules or module paths, not one module")
    out = [_module_at(model, b, "blocks") if isinstance(b, str) else b for b in blocks]
    inside = {id(m) for m in model.modules()}
    for b in out:
        if not isinstance(b, nn.Module) or id(b) not in inside:
            raise StructureError(f"blocks= holds {type(b).__name__} that is not a module of the model; pass its blocks")
    return out


def resolve_head(model: nn.Module, head: nn.Module | str | None) -> nn.Module | None:
    """The module whose output is the logits: given (a module or its path), `model.lm_head`, the one module named
    `lm_head` further down, or transformers' `get_output_embeddings()`."""
    if isinstance(head, str):
        return _module_at(model, head, "head")
    if head is not None:
        return head
    if isinstance(getattr(model, "lm_head", None), nn.Module):
        return model.lm_head
    nested = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == "lm_head"]
    if len(nested) == 1:  # a wrapper's model (a LightningModule holding a transformers model)
        return nested[0]
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            found = getter()
        except (NotImplementedError, AttributeError):  # base classes of models without one say so this way
            return None
        return found if isinstance(found, nn.Module) else None
    return None


def path_layer_of(model: nn.Module, blocks: Sequence[nn.Module]) -> Callable[[str], str]:
    """Parameter name -> layer named by its module path: the block holding it, else the module beside the
    blocks' container (or one of its ancestors) holding it."""
    paths = {id(m): n for n, m in model.named_modules()}
    block_paths = sorted((paths[id(b)] for b in blocks if id(b) in paths), key=len, reverse=True)
    ancestors = {".".join(p.split(".")[:k]) for p in block_paths for k in range(len(p.split(".")))}

    def layer_of(name: str) -> str:
        for b in block_paths:
            if b and name.startswith(b + "."):
                return b
        parts = name.split(".")
        for k in range(len(parts) - 1, 0, -1):  # the deepest ancestor of the blocks that holds it
            if ".".join(parts[:k]) in ancestors:
                return ".".join(parts[: k + 1])
        return parts[0]

    return layer_of


def describe(model: nn.Module, blocks: Sequence[nn.Module], head: nn.Module | None) -> dict:
    """What the monitor found, for a run directory's config.yaml and for messages."""
    paths = {id(m): n for n, m in model.named_modules()}
    names = [paths.get(id(b), "?") for b in blocks]
    container = names[0].rsplit(".", 1)[0] if names and "." in names[0] else None
    same = container is not None and all(n.rsplit(".", 1)[0] == container for n in names)
    found = f"{container} ({len(names)} x {type(blocks[0]).__name__})" if same else names or None
    return {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "parameters": sum(p.numel() for p in model.parameters()),
        "blocks": found,
        "head": paths.get(id(head)) if head is not None else None,
    }


def _attention_class(block: nn.Module) -> str | None:
    return next((type(m).__name__ for m in block.modules() if "attention" in type(m).__name__.lower()), None)


def unavailable(model: nn.Module, cfg, blocks: Sequence[nn.Module], sampler, head: nn.Module | None) -> dict[str, str]:
    """stat -> why the microscope cannot measure it on this model (with this FlowConfig)."""
    out: dict[str, str] = {}
    name = type(model).__name__
    if not blocks:
        why = (f"no repeated blocks found in {name} (no ModuleList of identical modules); pass them: "
               "FlowMonitor(model, optimizer, blocks=...)")  # fmt: skip
        out.update(dict.fromkeys(DEPTH_STATS, why))
    else:
        for on, stats, key in ((cfg.residual, ("resid_grad_norm",), "residual"),
                               (cfg.activations, ("act_rms", "act_max_abs"), "activations"),
                               (cfg.attention, ("attn_entropy", "attn_max_logit"), "attention")):  # fmt: skip
            if not on:
                out.update(dict.fromkeys(stats, f"turned off (FlowConfig({key}=False))"))
        if cfg.attention and sampler is not None and all(m is None for m in sampler.modules):
            what = _attention_class(blocks[0]) or "the blocks' attention"
            out.update(dict.fromkeys(("attn_entropy", "attn_max_logit"), (
                f"{what} computes its attention inside a fused kernel the monitor cannot re-run without knowing the "
                "model; a module offering attention_logits(x) makes it measurable (docs/flow.md)")))  # fmt: skip
        elif cfg.attention and sampler is not None:
            logits = [m for m in sampler.modules if m is not None and _gives_logits(m)]
            if not logits:
                out["attn_max_logit"] = "the attention modules offer probabilities only (attention_probs), no logits"
    if head is None or not cfg.logits:
        why = "turned off (FlowConfig(logits=False))" if not cfg.logits else (
            f"no output head found in {name} (no lm_head, no get_output_embeddings()); pass head=...")  # fmt: skip
        out.update(dict.fromkeys(LOGIT_STATS, why))
    return out


HOOKS_NOT_CALLED = (
    "the microscope's forward hooks were not called on a monitored step: a model that torch.compile compiled while "
    "they were detached never calls them; run the uncompiled module on monitored steps (FlowMonitor.is_monitored(), "
    "docs/flow.md)"
)


def note_hooks_called(unavailable: dict[str, str], called: bool, stats: Sequence[str]) -> bool:
    """After a monitored step: list `stats` as unavailable when its forward never called the hooks that take them,
    and take that back when a later one did. Returns whether they were newly listed."""
    if called:
        for stat in [s for s in stats if unavailable.get(s) == HOOKS_NOT_CALLED]:
            del unavailable[stat]
        return False
    new = [s for s in stats if s not in unavailable]
    unavailable.update(dict.fromkeys(new, HOOKS_NOT_CALLED))
    return bool(new)


def _gives_logits(module: nn.Module) -> bool:
    return isinstance(module, Attend) or callable(getattr(module, "attention_logits", None))
