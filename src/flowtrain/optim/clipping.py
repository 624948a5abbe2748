"""Gradient clipping that reports what it did, without a host sync.

`GradClipper(cfg)(params)` runs after backward, on the parameters (not the gradients: AGC needs the weights).
`params` is an iterable of parameters, or of (name, parameter) pairs to get per-tensor names in the stats;
parameters without a gradient are skipped. It returns ClipStats of 0-dim device tensors: nothing here calls
.item(), so the step never waits for the device; the trainer moves the numbers to the host once per log line.

Kinds (ClipConfig.kind):
* norm: global L2 norm n over all gradients; coef = min(1, max_norm / (n + 1e-6)); every gradient is
  multiplied by coef with one fused multi-tensor op per device (what torch's clip_grad_norm_(foreach=True)
  does). grad_norm_postclip = n * coef.
* value: clamp every element to [-max_value, max_value]; post norm measured after; clip_coef = post / pre.
* per_tensor: each tensor's own norm clipped to max_norm (same formula as norm, per tensor).
* agc: adaptive gradient clipping (Brock et al. 2021, NFNets), unit-wise. A unit is a row along dim 0 (an
  output unit of a Linear, a token's vector in an Embedding, an output channel of a conv); 1-D and 0-dim
  parameters (biases, norm gains) are clipped element-wise, as in the NFNet reference. A unit whose
  ||G_i|| / max(||W_i||, agc_eps) exceeds agc_lambda is rescaled to exactly that ratio. Under FSDP2 (dim-0
  sharding) every row lives on one rank, so the unit norms are computed on local shards.
* zclip: z-score clipping (Kumar et al. 2025). The first zclip_warmup finite grad norms only build the
  running mean and variance (no clipping). Then, with EMA estimates mu and var (decay zclip_alpha) and
  sd = sqrt(var), a norm n with z = (n - mu) / (sd + 1e-6) > zclip_z is clipped to mu + zclip_z * sd.
  The statistics are updated with the norm after clipping, so a spike does not widen the band it is judged
  by: delta = n_c - mu; mu += (1 - alpha) delta; var = alpha (var + (1 - alpha) delta^2).
  state_dict() holds plain floats (JSON), so a resumed run continues bit for bit.
* off: nothing is changed; the pre-clip norm is still reported (post == pre, coef 1).

Non-finite gradients: if the global pre-clip norm is NaN or Inf, no kind touches any gradient (coef 1,
clipped false; a coefficient of 0 would turn Inf into NaN and the rest into zeros that look healthy), and
zclip's statistics skip the step. grad_norm_preclip carries the NaN/Inf: the guard reads it and decides.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from flowtrain.errors import CheckpointError
from flowtrain.optim.config import ClipConfig
from flowtrain.tensorstats import max_abs, sums_of_squares

try:
    from torch.distributed.tensor import DTensor
except Exception:  # pragma: no cover - builds without distributed
    DTensor = None  # type: ignore[assignment,misc]

_EPS = 1e-6  # as in torch.nn.utils.clip_grad_norm_


@dataclass
class ClipStats:
    """What clipping saw and did this step. All tensors live on the gradients' device; no sync was needed.

    grad_norm_preclip / grad_norm_postclip: global L2 norm of all gradients before / after clipping.
    clip_coef: post / pre (for norm and zclip exactly the factor every gradient was multiplied by).
    clipped: bool, whether any gradient changed.
    Per tensor, in the order of the parameters that had a gradient: tensor_norm_preclip/_postclip [n];
    tensor_clipped_fraction [n] (per_tensor: 0/1; agc: the fraction of units rescaled; else None);
    names when the clipper got (name, param) pairs; threshold: the norm cap in force (norm, per_tensor:
    max_norm; zclip: mu + z * sd, +inf during warm-up), else None.
    """

    grad_norm_preclip: torch.Tensor
    grad_norm_postclip: torch.Tensor
    clip_coef: torch.Tensor
    clipped: torch.Tensor
    tensor_norm_preclip: torch.Tensor | None = None
    tensor_norm_postclip: torch.Tensor | None = None
    tensor_clipped_fraction: torch.Tensor | None = None
    names: list[str] | None = None
    threshold: torch.Tensor | None = None


def _with_grads(params: Iterable[Any]) -> tuple[list[str] | None, list[torch.Tensor]]:
    items = list(params)
    named = isinstance(items[0], tuple) if items else False
    pairs = items if named else [("", p) for p in items]
    kept = [(n, p) for n, p in pairs if p.grad is not None]
    return ([n for n, _ in kept] if named else None), [p for _, p in kept]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def _scale_(grads: list[torch.Tensor], coef: torch.Tensor) -> None:
    """grads *= coef (0-dim tensor), fused per device, in place. On the CPU a coefficient of exactly 1 (the
    common, unclipped step) skips the pass over the gradients: reading it costs no device sync there, and
    x * 1.0 == x bit for bit."""
    if _is_one_on_cpu(coef):
        return
    by_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
    for g in grads:
        by_device[g.device].append(g)
    for device, group in by_device.items():
        torch._foreach_mul_(group, coef.to(device))


def _is_one_on_cpu(coef: torch.Tensor) -> bool:
    """coef == 1 for a CPU tensor (a host read is free there); False, without reading, on any other device."""
    return coef.device.type == "cpu" and coef.item() == 1.0


def _unit_norms(t: torch.Tensor) -> torch.Tensor:
    """AGC units: L2 norm of each dim-0 row, shaped to broadcast against t; |x| for 1-D and 0-dim tensors."""
    if t.ndim < 2:
        return t.detach().abs().float()
    rows = torch.linalg.vector_norm(t.detach().reshape(t.shape[0], -1), dim=1, dtype=torch.float32)
    return rows.view(-1, *([1] * (t.ndim - 1)))


class GradClipper:
    """Clips gradients in place per ClipConfig and returns ClipStats (see the module docstring)."""

    def __init__(self, cfg: ClipConfig):
        self.cfg = cfg
        # zclip state: finite warm-up norms seen (capped at zclip_warmup), running mean and variance.
        self._count = torch.zeros((), dtype=torch.float32)
        self._mean = torch.zeros((), dtype=torch.float32)
        self._var = torch.zeros((), dtype=torch.float32)

    def __call__(self, params: Iterable[Any], grad_sumsq: torch.Tensor | None = None) -> ClipStats:
        """Clip the gradients of `params` in place. `grad_sumsq`: the per-tensor sums of squares of exactly
        these gradients, when an observer already computed them this step (saves a pass over the gradients)."""
        names, ps = _with_grads(params)
        grads = [p.grad for p in ps]
        if not grads:
            zero = torch.zeros(())
            return ClipStats(zero, zero, torch.ones(()), torch.zeros((), dtype=torch.bool), names=names)
        sq = grad_sumsq if grad_sumsq is not None and len(grad_sumsq) == len(grads) else sums_of_squares(grads)
        pre = sq.sum().sqrt()
        finite = torch.isfinite(pre)
        kind = self.cfg.kind
        if kind == "off":
            stats = ClipStats(pre, pre, torch.ones_like(pre), torch.zeros_like(finite), sq.sqrt(), sq.sqrt())
        elif kind == "norm":
            cap = torch.full_like(pre, self.cfg.max_norm)
            stats = self._by_factor(grads, sq, pre, torch.clamp(cap / (pre + _EPS), max=1.0), finite)
            stats.threshold = cap
        elif kind == "zclip":
            stats = self._zclip(grads, sq, pre, finite)
        elif kind == "value":
            stats = self._value(grads, sq, pre, finite)
        elif kind == "per_tensor":
            stats = self._per_tensor(grads, sq, pre, finite)
        else:
            stats = self._agc(ps, grads, sq, pre, finite)
        stats.names = names
        return stats

    def _by_factor(
        self, grads: list[torch.Tensor], sq: torch.Tensor, pre: torch.Tensor, coef: torch.Tensor, finite
    ) -> ClipStats:
        """Multiply every gradient by one coefficient (norm, zclip)."""
        coef = torch.where(finite, coef, torch.ones_like(coef))
        _scale_(grads, coef)
        pre_t = sq.sqrt()
        return ClipStats(pre, pre * coef, coef, coef < 1, pre_t, pre_t * coef)

    def _from_post(self, pre: torch.Tensor, sq: torch.Tensor, post_sq: torch.Tensor, clipped) -> ClipStats:
        post = post_sq.sum().sqrt()
        ok = torch.isfinite(pre) & (pre > 0)
        coef = torch.where(ok, post / torch.where(ok, pre, torch.ones_like(pre)), torch.ones_like(pre))
        return ClipStats(pre, post, coef, clipped, sq.sqrt(), post_sq.sqrt())

    def _value(self, grads: list[torch.Tensor], sq: torch.Tensor, pre: torch.Tensor, finite) -> ClipStats:
        v = self.cfg.max_value
        clipped = finite & (max_abs(grads).max() > v)
        # +inf bound when non-finite: the clamp is then a no-op (no second code path, no sync).
        bound = torch.where(finite, torch.full_like(pre, v), torch.full_like(pre, torch.inf))
        for g in grads:
            b = bound.to(g.device)
            g.clamp_(min=-b, max=b)
        return self._from_post(pre, sq, sums_of_squares(grads), clipped)

    def _per_tensor(self, grads: list[torch.Tensor], sq: torch.Tensor, pre: torch.Tensor, finite) -> ClipStats:
        pre_t = sq.sqrt()
        coefs = torch.clamp(self.cfg.max_norm / (pre_t + _EPS), max=1.0)
        coefs = torch.where(finite, coefs, torch.ones_like(coefs))
        by_device: dict[torch.device, list[int]] = defaultdict(list)
        for i, g in enumerate(grads):
            by_device[g.device].append(i)
        for device, idx in by_device.items():
            local = coefs.to(device)
            torch._foreach_mul_([grads[i] for i in idx], [local[i] for i in idx])
        stats = self._from_post(pre, sq, sq * coefs * coefs, (coefs < 1).any())
        stats.tensor_clipped_fraction = (coefs < 1).float()
        stats.threshold = torch.full_like(pre, self.cfg.max_norm)
        return stats

    def _agc(
        self, ps: list[torch.Tensor], grads: list[torch.Tensor], sq: torch.Tensor, pre: torch.Tensor, finite
    ) -> ClipStats:
        lam, eps = self.cfg.agc_lambda, self.cfg.agc_eps
        fractions = []
        for p, g in zip(ps, grads, strict=True):
            w_local, g_local = _local(p), _local(g)
            cap = lam * _unit_norms(w_local).clamp_min(eps)
            g_norm = _unit_norms(g_local)
            trigger = (g_norm > cap) & finite.to(g_norm.device)
            scale = torch.where(trigger, cap / g_norm.clamp_min(_EPS), torch.ones_like(g_norm))
            g_local.mul_(scale.to(g_local.dtype))
            fractions.append(trigger.float().mean())
        fraction = torch.stack([f.to(pre.device) for f in fractions])
        stats = self._from_post(pre, sq, sums_of_squares(grads), (fraction > 0).any())
        stats.tensor_clipped_fraction = fraction
        return stats

    def _zclip(self, grads: list[torch.Tensor], sq: torch.Tensor, pre: torch.Tensor, finite) -> ClipStats:
        cfg = self.cfg
        if self._mean.device != pre.device:
            self._count, self._mean, self._var = (t.to(pre.device) for t in (self._count, self._mean, self._var))
        count, mean, var = self._count, self._mean, self._var
        active = count >= cfg.zclip_warmup
        sd = var.clamp_min(0).sqrt()
        cap = mean + cfg.zclip_z * sd
        trigger = active & ((pre - mean) / (sd + _EPS) > cfg.zclip_z)
        coef = torch.where(trigger, cap / torch.where(trigger, pre, torch.ones_like(pre)), torch.ones_like(pre))
        stats = self._by_factor(grads, sq, pre, coef, finite)
        stats.threshold = torch.where(active, cap, torch.full_like(cap, torch.inf))

        x = stats.grad_norm_postclip
        delta = x - mean
        n = count + 1
        warm_mean = mean + delta / n
        warm_var = var + (delta * (x - warm_mean) - var) / n
        ema_mean = mean + (1 - cfg.zclip_alpha) * delta
        ema_var = cfg.zclip_alpha * (var + (1 - cfg.zclip_alpha) * delta * delta)
        self._mean = torch.where(finite, torch.where(active, ema_mean, warm_mean), mean)
        self._var = torch.where(finite, torch.where(active, ema_var, warm_var), var)
        self._count = torch.where(finite & ~active, n, count)
        return stats

    def state_dict(self) -> dict[str, Any]:
        """zclip's statistics as plain floats (JSON-able; float32 round-trips exactly); {} for other kinds.

        This is the only place that syncs with the device, and only when a checkpoint is written.
        """
        if self.cfg.kind != "zclip":
            return {}
        return {"kind": "zclip", "count": self._count.item(), "mean": self._mean.item(), "var": self._var.item()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore zclip statistics. State from another kind (or {}) leaves a zclip clipper to warm up anew."""
        if self.cfg.kind != "zclip" or state.get("kind") != "zclip":
            return
        try:
            values = [torch.tensor(float(state[k]), dtype=torch.float32) for k in ("count", "mean", "var")]
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"clipper state {state!r} is incomplete ({exc}); "
                "resume from another checkpoint or drop its clipper state"
            ) from None
        device = self._mean.device
        self._count, self._mean, self._var = (v.to(device) for v in values)
