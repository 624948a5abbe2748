"""Scale-out on PyTorch's own engine: process group, DDP / FSDP2 wrapping, and the few collectives a step needs.

`torchrun --nproc_per_node N -m flowtrain train ...` starts N processes with RANK / WORLD_SIZE / LOCAL_RANK
in the environment; `init_distributed` joins them into one process group (nccl on CUDA, gloo on CPU). A run
with train.parallel=ddp|fsdp but no torchrun environment becomes a 1-process group (FSDP2 on one GPU).

Why the numbers match one process (docs/distributed.md):
* the global batch of a step is defined without reference to ranks: it is `grad_accum` micro-batches, micro-batch
  slot i read by its own BatchLoader stream (rank=i, world_size=grad_accum). Rank r runs the slots
  r*a .. r*a+a-1 (a = grad_accum / world_size), so 1 process x 2 slots and 2 ranks x 1 slot read identical data;
  with more ranks than slots, s = world_size / grad_accum ranks share a slot, each taking batch_size / s of its
  rows. A checkpoint resumes on any world size that divides grad_accum or that grad_accum divides;
* DDP and FSDP2 average gradients over ranks, so each rank's loss is scaled by world_size before backward;
* reductions over sharded parameters complete over the mesh in flowtrain.tensorstats;
* the guard's decision is agreed with an all-reduce (MAX), so no rank updates while another skips.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from flowtrain.errors import CheckpointError, ConfigError

_ACTION_RANK = {"proceed": 0, "skip": 1, "rollback": 2, "stop": 3}
_ACTIONS = {v: k for k, v in _ACTION_RANK.items()}


@dataclass(frozen=True)
class DistContext:
    """Who this process is in the run. strategy none: a plain single process (no process group)."""

    strategy: str  # none | ddp | fsdp
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.strategy != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value is not None else default
    except ValueError:
        raise ConfigError(
            f"environment variable {name}={value!r} is not an integer; start the run with torchrun"
        ) from None


def resolve_strategy(parallel: str, world_size: int) -> str:
    """train.parallel → none | ddp | fsdp. auto = ddp when torchrun started several processes."""
    if parallel == "auto":
        return "ddp" if world_size > 1 else "none"
    if parallel == "none" and world_size > 1:
        raise ConfigError(
            f"train.parallel=none but torchrun started WORLD_SIZE={world_size} processes; "
            "set train.parallel=ddp or fsdp (or auto), or run one process"
        )
    return parallel


def slot_layout(grad_accum: int, world_size: int, batch_size: int) -> tuple[int, int]:
    """(micro-batch slots per rank, ranks per slot) so the global batch stays batch_size * grad_accum rows.

    More slots than ranks: each rank runs grad_accum / world_size whole slots. More ranks than slots (the
    default grad_accum=1 under torchrun): world_size / grad_accum ranks share each slot, each taking an equal
    slice of its rows."""
    if grad_accum % world_size == 0:
        return grad_accum // world_size, 1
    if world_size % grad_accum == 0:
        share = world_size // grad_accum
        if batch_size % share == 0:
            return 1, share
        raise ConfigError(
            f"train.batch_size={batch_size} cannot be split evenly over the {share} ranks that share each of the "
            f"train.grad_accum={grad_accum} micro-batches; set train.batch_size to a multiple of {share}"
        )
    raise ConfigError(
        f"train.grad_accum={grad_accum} and the world size {world_size} do not divide each other: the global batch "
        f"is batch_size * grad_accum, split evenly over ranks; set train.grad_accum to a multiple or a divisor of "
        f"{world_size}"
    )


def select_dist_device(requested: str, local_rank: int) -> torch.device:
    """cuda:LOCAL_RANK when CUDA is requested or available (auto), else cpu (mps has no collectives)."""
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                "lower --nproc_per_node to the number of GPUs"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        return device
    if requested == "cuda":
        raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    if requested == "mps":
        raise ConfigError("train.parallel=ddp/fsdp needs cuda or cpu (mps has no collectives); set train.device")
    return torch.device("cpu")


def init_distributed(parallel: str, requested_device: str) -> tuple[DistContext, torch.device | None]:
    """Join the process group when the run is distributed; return (context, device or None = choose as usual).

    Ranks other than 0 get their stdout silenced: only rank 0 prints (errors on stderr still show everywhere).
    """
    world = _env_int("WORLD_SIZE", 1)
    strategy = resolve_strategy(parallel, world)
    if strategy == "none":
        return DistContext("none"), None
    local_rank = _env_int("LOCAL_RANK", 0)
    device = select_dist_device(requested_device, local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "MASTER_ADDR" in os.environ:  # torchrun (single or multi-node, c10d rendezvous)
            dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        else:  # one process without torchrun: an in-memory store is all a 1-rank group needs
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    ctx = DistContext(strategy, dist.get_rank(), dist.get_world_size(), local_rank)
    if not ctx.is_main:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    return ctx, device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ---- wrapping ---------------------------------------------------------------------------------------------
def wrap_model(model: nn.Module, ctx: DistContext, device: torch.device, bf16: bool) -> nn.Module:
    """DDP around the model, or FSDP2 `fully_shard` on every block and then the root (in place).

    bf16 (CUDA with train.dtype=bfloat16): FSDP2 keeps fp32 sharded master weights, all-gathers bf16 copies
    for compute and reduce-scatters gradients in fp32 (MixedPrecisionPolicy).
    """
    if ctx.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if ctx.strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kwargs = {}
        if bf16 and device.type == "cuda":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in getattr(model, "blocks", []):
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
    return model


def grad_sync(model: nn.Module, ctx: DistContext, last: bool) -> contextlib.AbstractContextManager:
    """DDP: no all-reduce on all but the last micro-batch (gradients accumulate locally, one sync per step).

    FSDP2 keeps its default (reduce-scatter every micro-batch): accumulating sharded gradients is what keeps
    its memory at 1/N; skipping the sync would hold full unsharded gradients instead.
    """
    if ctx.strategy == "ddp" and not last:
        return model.no_sync()
    return contextlib.nullcontext()


# ---- collectives the step and the trainer use -------------------------------------------------------------
def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def global_count(local: int, device: torch.device) -> int:
    t = torch.tensor([local], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item())


def agree_on_verdict(verdict, host_ran: bool, device: torch.device, guard=None):
    """Make the guard's decision identical on every rank: the strongest decision of any rank wins.

    The skip tensor is all-reduced with MAX (a NaN seen by one rank only makes every rank skip). When host
    checks ran, the host action is agreed the same way; a rank whose own view was milder adopts the decision
    and its guard's skip counters follow, so guard state stays the same everywhere.
    """
    if verdict.skip is None and not host_ran:
        return verdict
    own = _ACTION_RANK[verdict.action] if host_ran else 0
    flags = torch.zeros(2, dtype=torch.float32, device=device)
    if verdict.skip is not None:
        flags[0] = verdict.skip.float()
    flags[1] = own
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if verdict.skip is not None:
        verdict.skip = flags[0] > 0
    if host_ran:
        agreed = _ACTIONS[int(flags[1].item())]
        if agreed == "skip" and verdict.action != "skip" and guard is not None:
            guard.skipped_steps += 1
            guard.consecutive_skips += 1
        verdict.action = agreed
        if agreed == "skip" and verdict.skip is None:
            verdict.skip = torch.ones((), dtype=torch.bool, device=device)
    return verdict


class DataParallel:
    """The collectives of the loop's step, in one place: who this process is, where collective tensors live, and
    the few reductions a step makes (checkpoints and the data streams make their own). In one process (strategy
    none, or a 1-rank group) each is the trivial no-op."""

    def __init__(self, ctx: DistContext, device: torch.device, padded_rows: bool = False):
        self.ctx = ctx
        # the GPU for nccl, the CPU for gloo
        self.comm_device = device if device.type == "cuda" else torch.device("cpu")
        self.padded_rows = padded_rows  # varlen loader: rows are padded, so real target counts differ by rank

    @property
    def world_size(self) -> int:
        return self.ctx.world_size

    @property
    def rank(self) -> int:
        return self.ctx.rank

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    @property
    def enabled(self) -> bool:
        return self.ctx.enabled

    @property
    def strategy(self) -> str:
        return self.ctx.strategy

    def grad_sync(self, model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's backward: DDP all-reduces only on the last one."""
        return grad_sync(model, self.ctx, last)

    def global_targets(self, local: int) -> int:
        """Real targets in the whole global batch: the denominator of the step's mean loss."""
        if self.world_size == 1:
            return local
        if self.padded_rows:
            return global_count(local, self.comm_device)
        return local * self.world_size  # random / packed rows are full: every rank has the same count

    def global_loss(self, local: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of each rank's share of the step's mean loss."""
        return all_reduce_sum(local) if self.world_size > 1 else local

    def agree(self, verdict, guard, host_now: bool):
        """The guard's decision, made identical on every rank (the strongest one wins)."""
        if self.world_size == 1:
            return verdict
        host_ran = guard.cfg.enabled and (guard.host_every_step or host_now)
        return agree_on_verdict(verdict, host_ran, self.comm_device, guard)

    def max_over_ranks(self, value: int) -> int:
        """The largest of every rank's `value` (one all-reduce; e.g. a stop requested by a signal to one rank)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def broadcast_json(self, obj):
        """Rank 0's JSON-able `obj` on every rank (itself in one process)."""
        return broadcast_json(obj, self.comm_device) if self.enabled else obj

    def barrier(self) -> None:
        barrier()

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 does the work (e.g. prepares the shared data cache) before the others read its result."""
        if self.enabled and not self.is_main:
            barrier()
        yield
        if self.enabled and self.is_main:
            barrier()

    def shutdown(self) -> None:
        if self.enabled:
            barrier()
            shutdown()


class SlotLoaders:
    """This rank's micro-batch slots: slot i of every step is read by `make_loader(i)`, a BatchLoader built
    with rank=i, world_size=grad_accum, so the global batch does not depend on how many ranks share it. With more
    ranks than slots, the ranks sharing a slot each read it whole and keep their own slice of its rows.

    Their positions are saved for all slots (gathered from every rank: one dict for a single slot, the
    1-process format, else a list in slot order), so any world size that fits grad_accum can resume.
    """

    def __init__(self, make_loader, ctx: DistContext, grad_accum: int, comm_device: torch.device, batch_size: int):
        self.ctx, self.total, self.comm_device = ctx, grad_accum, comm_device
        self.per_rank, self.share = slot_layout(grad_accum, ctx.world_size, batch_size)
        self.first = ctx.rank // self.share * self.per_rank
        rows = batch_size // self.share
        self.rows = slice(ctx.rank % self.share * rows, (ctx.rank % self.share + 1) * rows)
        self.loaders = [make_loader(slot) for slot in range(self.first, self.first + self.per_rank)]
        self.transform = None  # (batch, batch number) -> batch: fault injection's corrupted data (train/faults.py)

    @property
    def position(self) -> int:
        """Steps' worth of batches served so far (every slot advances together), skipped ones included."""
        return self.loaders[0].step

    def next_step(self) -> list:
        number = self.position + 1  # 1-based: step N's batch in a run without rollbacks
        batches = [loader.next() for loader in self.loaders]
        if self.transform is not None:
            batches = [self.transform(b, number) for b in batches]
        return batches if self.share == 1 else [b.rows(self.rows) for b in batches]

    def skip_steps(self, steps: int) -> None:
        for loader in self.loaders:
            for _ in range(steps):
                loader.next()

    def state_dict(self):
        mine = [loader.state_dict() for loader in self.loaders]
        if self.ctx.enabled:  # ranks sharing a slot hold the same position: keep one per slot
            mine = [s for rank_states in gather_json(mine, self.comm_device) for s in rank_states][:: self.share]
        return mine[0] if len(mine) == 1 else mine

    def load_state_dict(self, saved) -> None:
        states = saved if isinstance(saved, list) else [saved]
        if len(states) != self.total:
            raise CheckpointError(
                f"the checkpoint's data position has {len(states)} micro-batch streams but "
                f"train.grad_accum={self.total}; resume with train.grad_accum={len(states)}"
            )
        for loader, state in zip(self.loaders, states[self.first : self.first + self.per_rank], strict=True):
            loader.load_state_dict(state)


def flow_config_for(flow, ctx: DistContext, tensorboard: bool = True):
    """Histograms are only drawn by TensorBoard: off without it. They reshape sharded tensors and are switched
    off under FSDP (said when the config asked for them); everything else is exact (update norms snapshot each
    rank's shard; attention is read at the kernel, inside FSDP's forward)."""
    if not flow.histogram_interval or not flow.enabled:
        return flow
    if ctx.strategy == "fsdp" and "histogram_interval" in flow.model_fields_set:
        print("flowtrain: under FSDP gradient and weight histograms are off")
    if ctx.strategy == "fsdp" or not tensorboard:
        flow = flow.model_copy(update={"histogram_interval": 0})
    return flow


def _json_tensor(obj, device: torch.device) -> torch.Tensor:
    return torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8, device=device)


def gather_json(obj, device: torch.device) -> list:
    """Every rank's JSON-able `obj`, in rank order, on every rank. Bytes over the wire, never pickle."""
    data = _json_tensor(obj, device)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return [json.loads(bytes(p[: int(s.item())].tolist()).decode()) for p, s in zip(parts, sizes, strict=True)]


def broadcast_json(obj, device: torch.device):
    """Rank 0's JSON-able `obj` on every rank (e.g. the run name, which is a timestamp by default)."""
    return gather_json(obj, device)[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
