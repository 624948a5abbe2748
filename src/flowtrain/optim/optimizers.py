"""torch.optim optimizers with weight-decay groups, built from an OptimConfig.

Why groups: decaying embeddings, norm gains and biases pulls them towards 0 for no benefit (a norm gain of 0
silences its layer), so by default only matrices decay. Every parameter lands in exactly one group, tied
weights once, in `model.named_parameters()` order, so the same model always gives the same optimizer layout
(checkpoints load back) and the microscope can name each group's tensors from `group["names"]`.

Weight decay per optimizer, as torch implements it:
* adamw: decoupled decay, p <- p - lr * wd * p, applied to the "decay" group only.
* adam: Adam's weight_decay is an L2 penalty added to the gradient, which the adaptive denominator then
  rescales (so it is not weight decay; Loshchilov & Hutter 2019). We therefore build Adam with one group, "all",
  and no decay at all, whatever cfg.weight_decay says; use adamw for decay.
* sgd, rmsprop: weight_decay is the L2 penalty (for plain SGD that equals decoupled decay), decay group only.
* muon: the decay group's matrices (not the head) take torch's Muon with decoupled decay, the rest AdamW
  (optim/muon.py); groups "muon", "decay", "no_decay".
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import nn

from flowtrain.errors import ConfigError
from flowtrain.optim.config import OptimConfig
from flowtrain.optim.muon import MuonWithAdamW

try:
    from torch.distributed.tensor import DTensor
except Exception:  # pragma: no cover - builds without distributed
    DTensor = None  # type: ignore[assignment,misc]

ParamKind = Literal["embedding", "norm", "bias", "weight"]

_NORM_TYPES: tuple[type[nn.Module], ...] = tuple(
    t
    for t in (
        nn.LayerNorm,
        getattr(nn, "RMSNorm", None),
        nn.GroupNorm,
        nn.modules.batchnorm._NormBase,  # BatchNorm*d, InstanceNorm*d
        nn.LocalResponseNorm,
    )
    if t is not None
)
# When one tensor has several names (tied weights), the kind that decays least wins.
_KIND_PRIORITY: dict[str, int] = {"embedding": 0, "norm": 1, "bias": 2, "weight": 3}


def _is_norm_module(module: nn.Module) -> bool:
    """torch's norm layers, plus user norms named like one (a hand-written RMSNorm, QKNorm...)."""
    return isinstance(module, _NORM_TYPES) or type(module).__name__.endswith("Norm")


def param_kind(module: nn.Module, name: str, param: torch.Tensor) -> ParamKind:
    """Classify parameter `name` (a dotted name inside `module`, the root) for weight-decay grouping.

    embedding: the weight of an nn.Embedding; norm: any parameter of a norm layer (torch's LayerNorm,
    RMSNorm, GroupNorm, BatchNorm..., or a class whose name ends in "Norm"); bias: a 1-D parameter named
    "*.bias"; weight: everything else.
    """
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if isinstance(owner, nn.Embedding):
        return "embedding"
    if _is_norm_module(owner):
        return "norm"
    if leaf == "bias" and param.ndim == 1:
        return "bias"
    return "weight"


def named_trainable(model: nn.Module) -> Iterator[tuple[str, nn.Parameter, ParamKind]]:
    """(first name, parameter, kind) for each distinct trainable parameter, in named_parameters order."""
    kinds: dict[int, ParamKind] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        kind = param_kind(model, name, p)
        if id(p) not in kinds or _KIND_PRIORITY[kind] < _KIND_PRIORITY[kinds[id(p)]]:
            kinds[id(p)] = kind
    for name, p in model.named_parameters():
        if p.requires_grad:
            yield name, p, kinds[id(p)]


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """The parameter groups, always in the same order: ("decay", "no_decay"), or ("all",) for Adam."""
    named = list(named_trainable(model))
    if not named:
        raise ConfigError("the model has no trainable parameters; unfreeze some (requires_grad=True) to train it")
    unknown = sorted(set(cfg.no_decay) - {"bias", "norm", "embedding"})
    if unknown:
        raise ConfigError(f"optim.no_decay has unknown kind(s) {unknown}; use any of bias, norm, embedding")
    if cfg.name == "adam":
        return [
            {
                "name": "all",
                "params": [p for _, p, _ in named],
                "names": [n for n, _, _ in named],
                "weight_decay": 0.0,
            }
        ]
    decay = [(n, p) for n, p, kind in named if kind not in cfg.no_decay]
    keep = [(n, p) for n, p, kind in named if kind in cfg.no_decay]
    return [
        {
            "name": "decay",
            "params": [p for _, p in decay],
            "names": [n for n, _ in decay],
            "weight_decay": cfg.weight_decay,
        },
        {"name": "no_decay", "params": [p for _, p in keep], "names": [n for n, _ in keep], "weight_decay": 0.0},
    ]


def _hyperparameters(cfg: OptimConfig) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    if cfg.name in ("adamw", "adam", "muon"):  # muon: its AdamW half decides the implementation
        cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
        return cls, {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps}
    if cfg.name == "sgd":
        if cfg.nesterov and cfg.momentum == 0:
            raise ConfigError("optim.nesterov=true needs optim.momentum > 0; set a momentum or nesterov=false")
        return torch.optim.SGD, {"lr": cfg.lr, "momentum": cfg.momentum, "nesterov": cfg.nesterov}
    return torch.optim.RMSprop, {"lr": cfg.lr, "alpha": cfg.alpha, "eps": cfg.eps, "momentum": cfg.momentum}


FUSED_DEVICES = ("cpu", "cuda")  # where torch (>= 2.4) has fused Adam, AdamW and SGD steps


def fused_available(cls: type[torch.optim.Optimizer], device_type: str) -> bool:
    """Whether torch has a fused step for `cls` on `device_type`."""
    return device_type in FUSED_DEVICES and "fused" in inspect.signature(cls.__init__).parameters


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.Optimizer:
    """The configured torch optimizer over `model`'s trainable parameters, with weight-decay groups.

    implementation="auto" uses torch's fused kernel where it has one for the device (one kernel for the whole
    update: the fastest, docs/performance.md), else foreach. When torch's fused constructor refuses the
    parameters (no fused kernel for the device, or parameters that are not floating point), "auto" falls back
    to foreach; an explicit "fused" raises a ConfigError instead.
    """
    cls, hyper = _hyperparameters(cfg)
    groups = param_groups(model, cfg)
    make = lambda impl: cls(groups, **impl, **hyper)  # noqa: E731
    if cfg.name == "muon":
        muon, rest = _muon_groups(model, groups)
        adamw_lr = cfg.lr * cfg.adamw_lr_scale
        make = lambda impl: MuonWithAdamW(muon, rest, adamw_impl=impl, adamw_lr=adamw_lr, **hyper)  # noqa: E731
    impl = cfg.implementation
    if impl in ("auto", "fused") and fused_available(cls, device_type):
        try:
            return make({"fused": True})
        except (RuntimeError, ValueError) as exc:
            if impl == "fused":
                raise ConfigError(
                    f"optim.implementation=fused: torch refused it ({str(exc).splitlines()[0]}); "
                    "use implementation=auto or foreach"
                ) from None
    elif impl == "fused":
        raise ConfigError(
            f"optim.implementation=fused: torch has no fused {cls.__name__} for device {device_type!r}; "
            "use implementation=auto or foreach"
        )
    return make({"foreach": impl != "loop"})


def _muon_groups(model: nn.Module, groups: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """(Muon's group, AdamW's groups): the decay group's 2-D weights go to Muon, except embeddings (when
    optim.no_decay lets them decay) and the output head (`model.lm_head`): those stay with AdamW, as Muon's
    authors and torch's docs advise."""
    lm_head = getattr(model, "lm_head", None)
    kept = {id(p) for p in lm_head.parameters()} if isinstance(lm_head, nn.Module) else set()
    kept |= {id(p) for _, p, kind in named_trainable(model) if kind == "embedding"}
    decay = groups[0]
    picked = [i for i, p in enumerate(decay["params"]) if p.ndim == 2 and id(p) not in kept]
    if any(DTensor is not None and isinstance(decay["params"][i], DTensor) for i in picked):
        raise ConfigError(
            "optim.name=muon orthogonalizes whole matrices, and FSDP shards them; use train.parallel=ddp or "
            "optim.name=adamw"
        )
    muon = {"name": "muon", "weight_decay": decay["weight_decay"]}
    muon["params"] = [decay["params"][i] for i in picked]
    muon["names"] = [decay["names"][i] for i in picked]
    chosen = set(picked)
    others = [i for i in range(len(decay["params"])) if i not in chosen]
    rest = {**decay, "params": [decay["params"][i] for i in others], "names": [decay["names"][i] for i in others]}
    return [muon], [rest, *groups[1:]]
