"""The one place that reduces over lists of tensors (parameters, gradients, updates).

Everything here is fused (torch._foreach_* kernels: one launch per dtype/device group instead of one per tensor)
and returns device tensors: nothing calls .item(), so a caller can batch many statistics and move them to the
host once per logging step.

Callers that must agree bit for bit (the clipper and the monitor's gradient sums) both come through here.

Sharded parameters: for DTensor inputs (FSDP2), a tensor's local shard holds only part of the elements. We reduce
the local shards to sums of squares / maxima / counts and let `_full` finish the reduction over the mesh, so every
rank gets the numbers one process would get on the unsharded tensors. Plain tensors take the fast path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

try:  # DTensor is public from torch 2.4 on; keep import-time cheap and optional
    from torch.distributed.tensor import DTensor
except Exception:  # pragma: no cover - builds without distributed
    DTensor = None  # type: ignore[assignment,misc]


def _is_dtensor(t: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t


local = _local  # public: this rank's piece of a (possibly sharded) tensor


def _full(values: torch.Tensor, tensors: Sequence[torch.Tensor], op: str) -> torch.Tensor:
    """Finish per-tensor reductions of local shards over the device mesh of sharded tensors.

    `values[i]` is the local partial result of tensors[i] (a sum for op="sum", a max for op="max"). Replicated
    placements are already complete; sharded ones are all-reduced over the mesh dimensions they are sharded
    on only (FSDP: its one dimension; HSDP: the shard dimension, never the replicas, which hold the same
    shard and would be counted twice). Tensors with the same mesh and shard dimensions share one all-reduce.
    """
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        if _is_dtensor(t):
            dims = tuple(d for d, p in enumerate(t.placements) if p.is_shard())
            if dims:
                groups.setdefault((id(t.device_mesh), dims), []).append(i)
    if not groups:
        return values
    import torch.distributed as dist

    out = values.clone()
    reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
    for (_, dims), index in groups.items():
        mesh = tensors[index[0]].device_mesh
        part = out[index].clone()
        for d in dims:
            dist.all_reduce(part, op=reduce_op, group=mesh.get_group(d))
        out[index] = part
    return out


def _stack(parts: Sequence[torch.Tensor], like: Sequence[torch.Tensor]) -> torch.Tensor:
    if not parts:
        device = like[0].device if like else torch.device("cpu")
        return torch.zeros(0, dtype=torch.float32, device=device)
    return torch.stack(parts).float()  # stack promotes mixed dtypes; one conversion for all


def sums_of_squares(tensors: Sequence[torch.Tensor], shards_of: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Per-tensor sum of squared elements (float32), complete over shards.

    `shards_of`: when `tensors` are plain local pieces of sharded tensors (e.g. a snapshot of each rank's
    shard of the parameters), the sharded tensors they belong to, whose layout completes the reduction.
    """
    local = [_local(t) for t in tensors]
    norms = torch._foreach_norm(local, 2, dtype=torch.float32) if local else []  # float32 also for bf16 inputs
    sq = _stack(norms, local) ** 2
    return _full(sq, tensors if shards_of is None else shards_of, "sum")


def l2_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-tensor L2 norm, shape [len(tensors)]."""
    return sums_of_squares(tensors).sqrt()


def global_l2_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all tensors taken together (0-dim). NaN/Inf elements propagate, on purpose."""
    return sums_of_squares(tensors).sum().sqrt()


def max_abs(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-tensor max |x| (the inf-norm), shape [len(tensors)]; NaN propagates on the CPU."""
    return _max_abs(tensors, None)


def sumsq_and_max_abs(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums_of_squares, max_abs) of the same tensors; NaN propagates to the maxima everywhere."""
    sq = sums_of_squares(tensors)
    return sq, _max_abs(tensors, sq)


def _max_abs(tensors: Sequence[torch.Tensor], sumsq: torch.Tensor | None) -> torch.Tensor:
    local = [_local(t).detach() for t in tensors]
    if not local:
        return _stack([], local)
    if local[0].device.type != "cpu":  # accelerators: one fused launch instead of one per tensor
        mx = _stack(torch._foreach_norm(local, float("inf"), dtype=torch.float32), local)
        if sumsq is not None:  # the fused inf-norm may drop a NaN; the sum of squares keeps it
            mx = torch.where(torch.isnan(sumsq), sumsq, mx)
    else:  # torch's CPU inf-norm is slow (docs/performance.md): max(max x, -min x) from one aminmax a tensor
        lows, highs = zip(*(torch.aminmax(t) if t.numel() else (t.new_zeros(()),) * 2 for t in local), strict=True)
        mx = torch.maximum(_stack(highs, local), _stack(lows, local).neg())
    return _full(mx, tensors, "max")


def max_abs_one(t: torch.Tensor) -> torch.Tensor:
    """max |x| of one tensor (float32 0-dim) as max(max x, -min x): one aminmax pass (torch's CPU inf-norm is an
    order of magnitude slower, docs/performance.md); NaN propagates."""
    if t.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=t.device)
    lo, hi = torch.aminmax(t.detach())
    return torch.maximum(hi, -lo).float()


def numels(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-tensor element count of the full (unsharded) tensors, float32 on the tensors' device."""
    device = tensors[0].device if tensors else torch.device("cpu")
    return torch.tensor([float(t.numel()) for t in tensors], dtype=torch.float32, device=device)


def rms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-tensor root mean square, shape [len(tensors)]."""
    return (sums_of_squares(tensors) / numels(tensors).clamp_min(1)).sqrt()


def nonfinite_counts(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-tensor count of NaN/Inf elements (float32), complete over shards.

    One isfinite pass per tensor (no fused foreach kernel exists for it); callers that only need "is anything
    non-finite?" should test the global norm instead, which is already computed and propagates NaN/Inf.
    """
    local = [_local(t) for t in tensors]
    if local and local[0].device.type != "cpu":
        return _full(_nonfinite_batched(local), tensors, "sum")
    parts = [(~torch.isfinite(t)).sum() for t in local]
    return _full(_stack(parts, local), tensors, "sum")


BATCH_NUMEL = 1 << 20  # tensors up to this size are counted together (their copy is the memory it costs)


def _nonfinite_batched(local: list[torch.Tensor]) -> torch.Tensor:
    """Non-finite counts on an accelerator in a handful of launches instead of three per tensor (small models
    there are bound by launches): the small tensors are concatenated and tested in one pass, their counts are
    L1 norms of views of the 0/1 result (one fused launch; exact up to 2^24 per tensor, beyond any tensor
    batched here); tensors above BATCH_NUMEL are counted one by one (no copy of them is made)."""
    small = [i for i, t in enumerate(local) if t.numel() <= BATCH_NUMEL]
    counts: list[torch.Tensor | None] = [None] * len(local)
    if small:
        flat = torch.cat([local[i].reshape(-1) for i in small])
        bad = torch.isfinite(flat).logical_not_().float()
        views = bad.split([local[i].numel() for i in small])
        for i, c in zip(small, torch._foreach_norm(views, 1), strict=True):
            counts[i] = c
    for i, t in enumerate(local):
        if counts[i] is None:
            counts[i] = torch.isfinite(t).logical_not_().sum()
    return _stack(counts, local)


def sums(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-tensor plain sum (float32), complete over shards.

    For non-negative tensors (Adam's exp_avg_sq) this is the L1 norm; one sum per tensor measured ~3x faster
    on CPU than _foreach_norm(ord=1).
    """
    local = [_local(t) for t in tensors]
    return _full(_stack([t.sum(dtype=torch.float32) for t in local], local), tensors, "sum")


def sums_of_nonnegative(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """`sums` of tensors with no negative element (Adam's exp_avg_sq): on accelerators their L1 norms, one
    fused launch for the whole list instead of one sum per tensor."""
    local = [_local(t) for t in tensors]
    if local and local[0].device.type != "cpu":
        return _full(_stack(torch._foreach_norm(local, 1, dtype=torch.float32), local), tensors, "sum")
    return sums(tensors)


def sum_of_squares(t: torch.Tensor) -> torch.Tensor:
    """Sum of squares of one (unsharded, e.g. activation-gradient) tensor, float32 0-dim."""
    return torch.linalg.vector_norm(t.detach(), 2, dtype=torch.float32) ** 2


def all_reduce_sums_then_maxima(raw: torch.Tensor, summed_rows: int) -> None:
    """In place over the default process group: the first `summed_rows` rows of `raw` add up over ranks, the
    rest take the maximum (the probes' raw statistics: sums and counts, then maxima)."""
    import torch.distributed as dist

    dist.all_reduce(raw[:summed_rows], op=dist.ReduceOp.SUM)
    dist.all_reduce(raw[summed_rows:], op=dist.ReduceOp.MAX)
