"""Hooks along depth: the residual stream h_0 (input of the first block) .. h_L (output of the last block).

Attached from outside to any stack of modules (GPT's `blocks`, an MLP's layers, LSTM layers); the model knows
nothing about them. Hooks only read: forward hooks return None, tensor gradient hooks return None, sampled
attention is recomputed under no_grad with the RNG state restored, so training is bitwise unchanged.

Accumulation over micro-batches: each micro-batch has its own activations h_l^(m), disjoint variables of the
step's loss L = sum_m L_m. The gradient with respect to the whole step's activations is therefore the
concatenation of the per-micro-batch gradients, and its squared norm is the sum of their squared norms. So we
add up sums of squares (no gradient tensor is kept), which gives exactly ||dL/dh_l|| of the accumulated step:
the number one big batch of the same rows would give (tested with grad_accum=2).

Hooks are attached only while armed (monitored steps); under no_grad (evaluation) they return at once.

Cost: on the CPU (float32) a block's output h is only referenced in the forward; its gradient hook reads the
gradient and h in one call into flowtrain.kernels (h is in cache there: the backward of the layer that took h
has just read it), and the sums are kept as Python floats. The attention kernel's q and k are referenced in the
forward and read by one kernel call after the backward. Elsewhere (GPUs, bf16, masks) the sums stay device
tensors (no host sync) and activations are reduced in one batch per micro-batch. Either way an activation is
read after the block returned it; one that the model changed in place in between gives NaN for that step and is
read in the forward hook from then on.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from flowtrain import kernels, tensorstats
from flowtrain.flow.deferred import Deferred, gather

DEPTH_STATS = ("resid_grad_norm", "act_rms", "act_max_abs", "attn_entropy", "attn_max_logit")
# CPU kernels: a block's q and k are kept referenced until after the backward (then all blocks are read in one
# call, cheaper than one call per block in the forward) only while that holds on to at most this much memory
HOLD_BYTES = 16 << 20
# bytes per element of q that holding q and k keeps alive at most, in float32: their storage is the fused qkv
# projection (3 x q) or two tensors of their own (2 x q, less with grouped keys); the hook's quick bound
_QKV_BYTES = 12


def _add(prev, value):
    """Running sum of a statistic that is a Python float (CPU kernels) or a device tensor."""
    return value if prev is None else prev + value


def _max(prev, value):
    """Running max that keeps NaN (like torch.maximum) for floats and tensors alike."""
    if prev is None:
        return value
    if isinstance(prev, float) and isinstance(value, float):
        return prev if prev != prev or prev >= value else value
    return torch.maximum(torch.as_tensor(prev), torch.as_tensor(value))


_on_kernels = kernels.takes_one
_cpu_f32 = kernels.cpu_f32
_Tensor, _F32 = torch.Tensor, torch.float32


def _eager(hook):
    """The hook as torch.compile should see it: not traced, run as plain Python between compiled graphs.

    Traced, its bookkeeping (lists filled per block, flags per step) became guards, and the compiler
    recompiled for each block and step until it hit its limit and fell back to running the model eagerly
    (seen on an H200 with gpt2-124m). Left out of the graph, each hooked module boundary is a graph break on
    monitored steps only: between them the hooks are detached and the model runs as one graph.

    Outside compiled code the hook is called directly: going through torch.compiler.disable's wrapper at every
    call cost ~10 us per hook inside the training loop on a 2-core CPU (ten hooks a step). Under tracing,
    is_compiling() is True and the call goes to the disabled twin, which the compiler does not trace.
    """
    compiler = getattr(torch, "compiler", None)
    if compiler is None or not hasattr(compiler, "disable"):
        return hook
    disabled, compiling = compiler.disable(hook, recursive=True), compiler.is_compiling

    def guarded(*args):
        if compiling():
            return disabled(*args)
        return hook(*args)

    return guarded


class _NativeHook(functools.partial):
    """A C++ hook with its probe's state bound (a functools.partial: called from C without a Python frame).
    Copying a model copies its hooks: like a Python function, this one is shared, not copied (the state it
    holds cannot be copied)."""

    __slots__ = ()

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


def native_hooks_for(modules: Sequence[nn.Module]) -> object | None:
    """The C++ hooks (kernels.hooks(), flowhooks.cpp) when the modules' weights are CPU float32 tensors; else None.

    Only a model that runs on the CPU in float32 can use them (they take plain CPU float32 tensors and pass
    everything else to the Python hooks here), so nothing is built for a GPU or bf16 model."""
    first = next((p for m in modules for p in m.parameters()), None)
    if first is None or first.dtype is not _F32 or not first.is_cpu or type(first) is not nn.Parameter:
        return None
    native = kernels.hooks()
    if native is not None:  # torch.compile runs them between its graphs (see _Probe.arm); it need not say so
        warnings.filterwarnings("ignore", message="Dynamo does not know how to trace the builtin `_flowhooks")
    return native


_HOOK_KEY = "flowtrain.residual_gradient"  # our entry in a tensor's hook dict (torch's handles use integers)


def _hook_gradient(h: torch.Tensor, hook) -> None:
    """h.register_hook(hook), without the removable handle nobody here would use.

    Tensor.register_hook is Python that keeps a hook dict on the tensor, registers that dict with the node that
    made it and returns a RemovableHandle; inside the training loop on a 2-core CPU that cost ~33 us per block
    boundary, most of it the handle's Python. For a plain tensor without hooks of its own, this does the same
    two registrations directly (torch's own private calls, as register_hook makes them); anything else, or a
    torch without them, takes register_hook."""
    if type(h) is torch.Tensor and h.grad_fn is not None and h._backward_hooks is None:
        try:
            # an OrderedDict, as torch's own: a later register_hook keeps a weak reference to it and adds its
            # handle's integer id beside ours (a plain dict cannot be weakly referenced: that call would fail)
            h._backward_hooks = OrderedDict({_HOOK_KEY: hook})
            h.grad_fn._register_hook_dict(h)
            return
        except (AttributeError, TypeError, RuntimeError):
            h._backward_hooks = None
    h.register_hook(hook)


def _first_tensor(value) -> torch.Tensor | None:
    """A block's output may be a tensor or a tuple whose first element is the hidden state (LSTM, HF)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def find_kernel(block: nn.Module) -> nn.Module | None:
    """The attention kernel module of a block (flowtrain's `Attend`), whose inputs are the exact q and k."""
    from flowtrain.model.layers import Attend

    return next((m for m in block.modules() if isinstance(m, Attend)), None)


def kernel_attention_stats(samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """[n, 2] = (entropy, max logit) for n captured (q rows, k, allowed mask) samples, batched when shapes agree.

    q: [b, h, P, d] (the sampled query rows), k: [b, h, T, d], allowed: bool broadcastable to [b, h, P, T].
    Entropy (nats) is the mean over sampled rows of -sum_j p_ij log p_ij; the max logit is over allowed keys.
    """
    shapes = {(q.shape, k.shape, m.shape) for q, k, m in samples}
    if len(shapes) > 1:  # blocks of different shapes: one at a time
        return torch.cat([kernel_attention_stats([s]) for s in samples])
    q = torch.stack([s[0] for s in samples]).float()
    k = torch.stack([s[1] for s in samples]).float()
    allowed = torch.stack([s[2] for s in samples])
    scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    scores = scores.masked_fill(~allowed, float("-inf"))
    logp = torch.log_softmax(scores, dim=-1)
    plogp = torch.where(allowed, logp.exp() * logp, torch.zeros((), device=logp.device))
    entropy = -plogp.sum(-1).flatten(1).mean(1)
    max_logit = scores.flatten(1).amax(1)
    return torch.stack([entropy, max_logit], dim=1)


def find_attention(block: nn.Module) -> nn.Module | None:
    """The submodule of a block that can show its attention (has `attention_probs` or `attention_logits`)."""
    for module in block.modules():
        if callable(getattr(module, "attention_logits", None)) or callable(getattr(module, "attention_probs", None)):
            return module
    return None


def attention_stats(
    module: nn.Module, x: torch.Tensor, heads: int, positions: int, doc_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """[entropy, max logit] of a sample: the first `heads` heads, `positions` evenly spaced query rows.

    Entropy (nats) is the mean over sampled rows of -sum_j p_ij log p_ij. The max logit needs the
    pre-softmax scores, available when the module has `attention_logits(x)` ([B,H,T,T], masked entries
    -inf); with only `attention_probs(x)` it is NaN. `doc_ids` (the forward's document mask) is passed on
    when the forward got one.
    """
    extra = (doc_ids,) if doc_ids is not None else ()
    logits_fn = getattr(module, "attention_logits", None)
    if callable(logits_fn):
        scores = logits_fn(x, *extra).float()
        probs = torch.softmax(scores, dim=-1)
    else:
        scores, probs = None, module.attention_probs(x, *extra).float()
    t = probs.shape[-2]
    rows = torch.linspace(0, t - 1, min(positions, t), device=probs.device).round().long()
    p = probs[:, :heads, rows, :]
    plogp = torch.where(p > 0, p * torch.log(p.clamp_min(1e-38)), torch.zeros_like(p))
    entropy = -plogp.sum(-1).mean()
    if scores is None:
        max_logit = torch.full((), float("nan"), device=probs.device)
    else:
        max_logit = scores[:, :heads, rows, :].amax()
    return torch.stack([entropy, max_logit])


def _depth_matrix(
    resid_sumsq: list, act_sumsq: list, act_max: list, act_count: list, attention: list, scale
) -> np.ndarray:
    """[L+1, len(DEPTH_STATS)] float32 from per-boundary sums (a float; None or NaN where not seen) and per-block
    attention pairs (None where not sampled): square roots (NaN for a negative sum), residual gradients divided
    by the backward scale. Plain Python over a few floats, one array at the end: cheaper than numpy's calls at
    this size (each costs microseconds between torch's ops)."""
    nan = math.nan
    rows = []
    for r, a, m, c in zip(resid_sumsq, act_sumsq, act_max, act_count, strict=True):
        resid = math.sqrt(r) / scale if r is not None and r >= 0 else nan
        rms = math.sqrt(a / max(c, 1)) if a is not None and a >= 0 else nan
        rows.append([resid, rms, nan if a is None else m, nan, nan])
    for row, pair in zip(rows[1:], attention, strict=True):
        if pair is not None:
            row[3], row[4] = pair
    return np.array(rows, dtype=np.float32)


# hook kinds a module's tap slots take (model/layers.py, Tapped): the module calls the hook itself, as torch would
_TAP_SLOTS = {"forward": "flow_post_tap", "forward_pre": "flow_pre_tap"}
TAPS = True  # place hooks in free tap slots (False: always torch's module hooks; tests compare the two)


class _Tap:
    """The handle of a hook placed in a module's tap slot: remove() frees the slot (if it still holds the hook)."""

    __slots__ = ("module", "slot", "hook")

    def __init__(self, module: nn.Module, slot: str, hook) -> None:
        self.module, self.slot, self.hook = module, slot, hook

    def remove(self) -> None:
        if self.module.__dict__.get(self.slot) is self.hook:
            del self.module.__dict__[self.slot]  # back to the class's None


class _NoClock:
    """Where a probe used on its own books its time (nobody reads it)."""

    spent = 0.0


class _Probe:
    """Hooks that are attached only while armed (monitored steps): between monitored steps the model runs
    without them, on torch's fast path for modules without hooks (measured: ~0.2 ms a step on shakespeare-char
    when they stayed attached and returned at once). C++ hooks in tap slots are the exception: they stay, and
    return at once while disarmed (see disarm). remove() detaches everything for good."""

    armed = False
    removed = False
    _attached = False  # the hooks are in place (those in _kept stay while disarmed)
    _handles: list
    _kept: dict  # index in _eager_plan -> _Tap: C++ hooks in tap slots, attached until remove()
    _plan: list  # (module, "forward" | "forward_pre" | "forward_pre_kwargs", hook)
    _eager_plan: list | None = None  # _plan with each Python hook wrapped by _eager
    # the C++ hooks (flowhooks.cpp) and this probe's state there, when they take this probe's fast path
    _native: object | None = None
    _state: object | None = None

    def _reset(self) -> None:
        raise NotImplementedError

    def arm(self) -> None:
        self._reset()
        if self._state is not None:
            self._native.arm(self._state, True)
        self.armed = True
        if self._attached or self.removed:
            return
        if self._eager_plan is None:  # wrapped once, not at every re-attach
            # a C++ hook (_NativeHook) is left as it is: torch.compile does not
            # trace into C, it runs the call between its graphs, as it runs a hook wrapped by _eager
            self._eager_plan = [
                (module, kind, hook if isinstance(hook, _NativeHook) else _eager(hook))
                for module, kind, hook in self._plan
            ]
        for i, (module, kind, hook) in enumerate(self._eager_plan):
            if i in self._kept:
                continue
            slot = _TAP_SLOTS.get(kind) if TAPS else None
            if slot is not None and getattr(module, slot, False) is None:  # a free tap slot: no torch hook
                setattr(module, slot, hook)
                tap = _Tap(module, slot, hook)
                if isinstance(hook, _NativeHook):  # kept between monitored steps (see disarm)
                    self._kept[i] = tap
                else:
                    self._handles.append(tap)
            elif kind == "forward":
                self._handles.append(module.register_forward_hook(hook))
            else:
                kwargs = {"with_kwargs": True} if kind == "forward_pre_kwargs" else {}
                self._handles.append(module.register_forward_pre_hook(hook, **kwargs))
        self._attached = True

    def disarm(self) -> None:
        """Stop measuring. torch's hooks and the Python taps are detached (the model runs on torch's hook-free
        fast path); C++ hooks in tap slots stay, since while disarmed a call returns at once (~1 us): placing and
        removing them at each monitored step of `interval: 2` cost ~0.15 ms a step pair in the loop."""
        self.armed = False
        if self._state is not None:
            self._native.arm(self._state, False)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._attached = False

    def remove(self) -> None:
        self.disarm()
        for tap in self._kept.values():
            tap.remove()
        self._kept.clear()
        self.removed = True


class DepthProbe(_Probe):
    """Forward/backward hooks on a stack of blocks; accumulates depth statistics while armed."""

    def __init__(self, blocks: Sequence[nn.Module], cfg, clock=None) -> None:
        self.blocks = list(blocks)
        self.cfg = cfg
        self.clock = clock if clock is not None else _NoClock()
        self.n = len(self.blocks) + 1  # boundaries h_0..h_L
        self._changed_in_place = [False] * self.n  # a boundary whose h the model changes after the block (_read_held)
        # attention: read q, k at the kernel when the model has one (no recompute), else recompute a sample
        self.kernels = [find_kernel(b) if cfg.attention else None for b in self.blocks]
        self.attn_modules = [
            find_attention(b) if cfg.attention and kern is None else None
            for b, kern in zip(self.blocks, self.kernels, strict=True)
        ]
        self._rows_cache: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._host_rows_cache: dict[int, np.ndarray] = {}
        self._mask_cache: dict[tuple[int, int, bool, torch.device], torch.Tensor] = {}
        self.armed = False
        self._handles: list = []
        self._kept: dict[int, _Tap] = {}
        self.resid_sumsq: list = []
        self.act_sumsq: list = []
        self.act_max: list = []
        self.act_count: list[int] = []
        # CPU kernels: h per boundary and its version, held until h's gradient hook reads both (see _observe)
        self._held: list[torch.Tensor | None] = []
        self._versions: list[int] = []
        self._reset()
        self._grad_hooks = [self._make_grad_hook(i) for i in range(self.n)]  # made once, registered per step
        self._on_input = self._make_output_hook(0)  # h_0 is the first block's input
        # CPU float32 with residual gradients and activations on: the boundaries' and the attention kernels'
        # hooks are C++ (flowhooks.cpp), which hands anything but a plain CPU float32 tensor back to the Python
        # hooks' general path here (_native_observe, _capture_qk)
        native = native_hooks_for(self.blocks) if cfg.residual and cfg.activations else None
        if native is not None:
            self._native = native
            self._state = native.probe(
                self.n,
                len(self.blocks),
                self._native_observe,
                self._capture_qk,
                None,
                self._flush_activations,
                self._host_rows,
                kernels._PLAIN,
                HOLD_BYTES,
            )
            self._plan = [(self.blocks[0], "forward_pre", _NativeHook(native.on_input, self._state))]
            self._plan += [
                (block, "forward", _NativeHook(native.on_output, self._state, i + 1))
                for i, block in enumerate(self.blocks)
            ]
        else:
            self._plan = [(self.blocks[0], "forward_pre", self._on_block_input)]
            self._plan += [(block, "forward", self._make_output_hook(i + 1)) for i, block in enumerate(self.blocks)]
        for i, kernel in enumerate(self.kernels):
            if kernel is not None:
                hook = self._make_kernel_hook(i) if native is None else _NativeHook(native.on_kernel, self._state, i)
                self._plan.append((kernel, "forward_pre", hook))
        for i, attn in enumerate(self.attn_modules):
            if attn is not None:
                self._plan.append((attn, "forward_pre_kwargs", self._make_attn_input_hook(i)))

    def _reset(self) -> None:
        # per boundary: None (not seen), a float (CPU kernels) or a device tensor. Emptied in place: the hooks
        # keep these lists in their closures
        none = [None] * self.n
        self.resid_sumsq[:] = self.act_sumsq[:] = self.act_max[:] = self._held[:] = none
        self.act_count[:] = self._versions[:] = [0] * self.n
        self._holding = 0  # entries of _held that are not None
        self.attn_inputs: list[torch.Tensor | None] = [None] * len(self.blocks)
        self.attn_doc_ids: list[torch.Tensor | None] = [None] * len(self.blocks)
        self.qk_samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * len(self.blocks)
        self.qk_host: list[list[float] | None] = [None] * len(self.blocks)  # [entropy, max logit], CPU kernels
        self.qk_refs: list[tuple[torch.Tensor, torch.Tensor, bool] | None] = [None] * len(self.blocks)
        self._qk_taken = [False] * len(self.blocks)  # a block's q, k already taken this step (any of the above)
        self.qk_args: list[tuple | None] = [None] * len(self.blocks)  # the kernel's arguments, CPU (not looked at yet)
        self._to_read = {"args": False, "refs": False, "samples": False, "inputs": False}  # what attention() reads
        self._pending_acts: list[tuple[int, torch.Tensor, int]] = []  # (boundary, h, h's version)

    # -- hooks -----------------------------------------------------------------------------------------------

    def _observe(self, index: int, h: torch.Tensor | None) -> None:
        if h is None or not torch.is_grad_enabled():
            return
        cfg = self.cfg
        residual = cfg.residual and h.requires_grad
        if cfg.activations:
            on_kernels = _on_kernels(h)
            if self._changed_in_place[index] or (on_kernels and not residual):
                self._reduce_now(index, h, on_kernels)  # while h is in cache, as the block returned it
            elif on_kernels:
                # CPU kernels: h is read in its gradient's hook, with the gradient in the same call. The backward
                # of the layer that consumed h has just read it there (a norm keeps its input), so it is in
                # cache; autograd keeps h alive until then anyway
                if self._held[index] is not None:  # one not read yet (h's gradient did not come): read it now
                    self._read_held(index)
                self._held[index], self._versions[index] = h, h._version
                self._holding += 1
            else:
                # device: all boundaries of a micro-batch in one batch (the tensors are alive for the backward
                # pass anyway): a handful of fused ops instead of ~7 small ones per boundary
                self._pending_acts.append((index, h.detach(), h._version))
        if residual:
            _hook_gradient(h, self._grad_hooks[index])

    def _native_observe(self, index: int, h: torch.Tensor | None) -> bool:
        """The C++ hooks' fallback for a boundary they do not take: _observe; True when activations are now held
        or pending here (the C++ input hook then flushes them when the next micro-batch begins)."""
        self._observe(index, h)
        return bool(self._holding or self._pending_acts)

    def _take_native(self) -> None:
        """Add what the C++ hooks measured this step to the per-boundary sums, and their time to the clock."""
        resid, act_sumsq, act_max, act_count, spent = self._native.take(self._state)
        for i in range(self.n):
            if resid[i] is not None:
                self.resid_sumsq[i] = _add(self.resid_sumsq[i], resid[i])
            if act_sumsq[i] is not None:
                self.act_sumsq[i] = _add(self.act_sumsq[i], act_sumsq[i])
                self.act_max[i] = _max(self.act_max[i], act_max[i])
            self.act_count[i] += act_count[i]
        self.clock.spent += spent

    def _reduce_now(self, index: int, h: torch.Tensor, on_kernels: bool) -> None:
        if on_kernels:
            sq, mx = kernels.one(h)
        else:
            with torch.no_grad():
                sums, maxima = tensorstats.sumsq_and_max_abs([h.detach()])
            sq, mx = sums[0], maxima[0]
        self._add_activation(index, sq, mx, h.numel())

    def _read_held(self, index: int, grad: torch.Tensor | None = None):
        """Reduce the activation held at `index` (and `grad` in the same kernel call); returns grad's sum of
        squares. An activation changed in place since the block returned it (its version moved) no longer holds
        what the block produced: its statistics become NaN for this step, and from then on that boundary is read
        in the forward hook, as the block returns it."""
        h, version = self._held[index], self._versions[index]
        self._held[index] = None
        self._holding -= 1
        if grad is None:
            asq, amx = kernels.one(h)
            gsq = None
        else:
            gsq, _, asq, amx = kernels.two(grad, h)
        if h._version != version:
            asq = amx = math.nan
            self._changed_in_place[index] = True
        self._add_activation(index, asq, amx, h.numel())
        return gsq

    def _add_activation(self, index: int, sq, mx, count: int) -> None:
        self.act_sumsq[index] = _add(self.act_sumsq[index], sq)
        self.act_max[index] = _max(self.act_max[index], mx)
        self.act_count[index] += count

    def _flush_activations(self) -> None:
        """Reduce the activations not reduced yet (held CPU ones whose gradient never came, pending device
        ones) into the per-boundary accumulators."""
        if self._holding:
            for index, h in enumerate(self._held):
                if h is not None:
                    self._read_held(index)
        if not self._pending_acts:
            return
        pending, self._pending_acts = self._pending_acts, []
        sums, maxima = tensorstats.sumsq_and_max_abs([h for _, h, _ in pending])
        for (index, h, version), sq, mx in zip(pending, sums.unbind(0), maxima.unbind(0), strict=True):
            if h._version != version:  # changed in place after the block: as in _read_held
                sq = mx = math.nan
                self._changed_in_place[index] = True
            self._add_activation(index, sq, mx, h.numel())

    # The hooks below run at every block boundary of every monitored step, between torch's ops, where the caches
    # are cold and every Python call or attribute costs microseconds (measured in the training loop on a 2-core
    # CPU: ~30 us for a forward hook that went through three helpers). So the common case -- CPU kernels, a
    # plain contiguous float32 tensor, residual gradients and activations both on -- runs inline in one
    # closure; everything else takes the general path (_observe, _on_gradient).

    def _make_grad_hook(self, index: int):
        resid, act_sumsq, act_max, act_count = self.resid_sumsq, self.act_sumsq, self.act_max, self.act_count
        held, versions, clock, perf_counter = self._held, self._versions, self.clock, time.perf_counter

        def on_grad(grad: torch.Tensor) -> None:
            started = perf_counter()
            h = held[index]
            if h is not None and type(grad) is _Tensor and grad.dtype is _F32 and grad.is_cpu and grad.is_contiguous():
                held[index] = None
                self._holding -= 1
                count = h.numel()  # the kernels are loaded: h was held for them
                gsq, _, asq, amx = kernels._lib.two(grad.data_ptr(), grad.numel(), h.data_ptr(), count)
                if h._version != versions[index]:  # changed in place since the block returned it (_read_held)
                    asq = amx = math.nan
                    self._changed_in_place[index] = True
                r, a, m = resid[index], act_sumsq[index], act_max[index]
                resid[index] = gsq if r is None else r + gsq
                act_sumsq[index] = asq if a is None else a + asq
                act_max[index] = amx if m is None else _max(m, amx)
                act_count[index] += count
            else:
                self._on_gradient(index, grad)
            if index == 0 and (self._holding or self._pending_acts):  # the last boundary the backward pass
                self._flush_activations()  # reaches: this micro-batch is done
            clock.spent += perf_counter() - started

        return on_grad

    def _on_gradient(self, index: int, grad: torch.Tensor) -> None:
        if not _on_kernels(grad):
            sq = tensorstats.sum_of_squares(grad)
            if self._held[index] is not None:
                self._read_held(index)
        elif self._held[index] is not None:
            sq = self._read_held(index, grad)
        else:
            sq = kernels.one(grad)[0]
        self.resid_sumsq[index] = _add(self.resid_sumsq[index], sq)

    def _on_block_input(self, module, args) -> None:
        if self.armed and args:
            if self._holding or self._pending_acts:  # a new micro-batch begins: reduce the previous one's
                self._flush_activations()
            self._on_input(module, args, args[0])

    def _make_output_hook(self, index: int):
        grad_hook, held, versions, changed = self._grad_hooks[index], self._held, self._versions, self._changed_in_place
        clock, perf_counter, grad_enabled = self.clock, time.perf_counter, torch.is_grad_enabled
        inline = self.cfg.residual and self.cfg.activations

        def on_output(module, args, output) -> None:
            if not self.armed:
                return
            started = perf_counter()
            h = output if type(output) is _Tensor else _first_tensor(output)
            if (
                inline
                and type(h) is _Tensor
                and h.requires_grad
                and h.dtype is _F32
                and h.is_cpu
                and held[index] is None
                and not changed[index]
                and h._backward_hooks is None
                and h.is_contiguous()
                and kernels._lib is not None  # loaded (the general path loads it on first use)
                and grad_enabled()
            ):
                node = h.grad_fn
                if node is not None:  # what _observe does for this case: hold h, hook its gradient directly
                    held[index], versions[index] = h, h._version
                    self._holding += 1
                    h._backward_hooks = OrderedDict({_HOOK_KEY: grad_hook})  # see _hook_gradient
                    try:
                        node._register_hook_dict(h)
                    except (AttributeError, TypeError, RuntimeError):  # not this torch's private call after all
                        h._backward_hooks = None
                        held[index] = None
                        self._holding -= 1
                        self._observe(index, h)
                    clock.spent += perf_counter() - started
                    return
            self._observe(index, h)
            clock.spent += perf_counter() - started

        return on_output

    def _sample_rows(self, n: int, device: torch.device) -> torch.Tensor:
        key = (n, device)
        if key not in self._rows_cache:
            count = min(self.cfg.attn_positions, n)
            self._rows_cache[key] = torch.linspace(0, n - 1, count, device=device).round().long()
        return self._rows_cache[key]

    def _host_rows(self, n: int) -> np.ndarray:
        """_sample_rows for the CPU kernels: an int64 numpy array (cached: asked for at every monitored step)."""
        rows = self._host_rows_cache.get(n)
        if rows is None:
            rows = self._host_rows_cache[n] = self._sample_rows(n, torch.device("cpu")).numpy()
        return rows

    def _template_mask(self, n_query: int, n_key: int, is_causal: bool, device: torch.device) -> torch.Tensor:
        """[1, 1, P or 1, T] bool: which keys the sampled rows may see without an explicit mask (cached)."""
        key = (n_query, n_key, is_causal, device)
        if key not in self._mask_cache:
            rows = self._sample_rows(n_query, device)
            keys = torch.arange(n_key, device=device)
            offset = n_key - n_query
            allowed = keys[None, :] <= rows[:, None] + offset if is_causal else keys[None, :] >= 0
            self._mask_cache[key] = allowed[None, None]
        return self._mask_cache[key]

    def _make_kernel_hook(self, block: int):
        def on_kernel_input(module, args) -> None:
            """Keep the sampled query rows, their keys and which keys each row may see (first micro-batch)."""
            if not self.armed or len(args) < 2 or not torch.is_grad_enabled():
                return
            if self._qk_taken[block]:
                return
            started = time.perf_counter()
            self._qk_taken[block] = True
            q = args[0]
            if len(args) > 3 and args[3] is None and _cpu_f32(q) and q.numel() * _QKV_BYTES <= HOLD_BYTES:
                # CPU without a mask: keep the arguments as they are; attention() looks at them after the
                # backward pass (the checks and the reading cost the same there, away from torch's ops)
                self.qk_args[block] = args
                self._to_read["args"] = True
            else:
                self._capture_qk(block, args)
            self.clock.spent += time.perf_counter() - started

        return on_kernel_input

    def _capture_qk(self, block: int, args: tuple) -> None:
        q, k = args[0].detach(), args[1].detach()
        mask = args[3] if len(args) > 3 else None
        is_causal = bool(args[5]) if len(args) > 5 else mask is None
        if mask is None and kernels.attention_takes(q, k):
            held = q.untyped_storage().nbytes()
            if k.untyped_storage().data_ptr() != q.untyped_storage().data_ptr():
                held += k.untyped_storage().nbytes()
            if held <= HOLD_BYTES:  # keep references; all blocks are read by one kernel call after the backward
                self.qk_refs[block] = (q, k, is_causal)
                self._to_read["refs"] = True
            else:  # too much memory to hold on to until then: measure now, while q and k are in cache
                rows = self._host_rows(q.shape[-2])
                cfg = self.cfg
                stats = kernels.attention([q], [k], cfg.attn_batch, cfg.attn_heads, rows, is_causal)
                self.qk_host[block] = stats.tolist()[0]
            return
        nb, heads = self.cfg.attn_batch, self.cfg.attn_heads
        rows = self._sample_rows(q.shape[-2], q.device)
        if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
            allowed = mask[:nb].index_select(-2, rows)
        else:  # causal (query i sees keys up to i, aligned to the last key) or full
            allowed = self._template_mask(q.shape[-2], k.shape[-2], is_causal, q.device)
        self.qk_samples[block] = (q[:nb, :heads].index_select(-2, rows), k[:nb, :heads], allowed)
        self._to_read["samples"] = True

    def _make_attn_input_hook(self, block: int):
        def on_attn_input(module, args, kwargs) -> None:
            if self.armed and self.attn_inputs[block] is None and args and torch.is_grad_enabled():
                x = _first_tensor(args[0])
                if x is None:
                    return
                n = self.cfg.attn_batch
                self.attn_inputs[block] = x.detach()[:n].clone()
                self._to_read["inputs"] = True
                doc_ids = kwargs.get("doc_ids", args[1] if len(args) > 1 else None)
                self.attn_doc_ids[block] = doc_ids[:n] if isinstance(doc_ids, torch.Tensor) else None

        return on_attn_input

    # -- results ---------------------------------------------------------------------------------------------

    def _kernel_refs_attention(self, out: list) -> None:
        """Attention of the referenced (CPU float32) q, k: one kernel call per group of equal shapes."""
        groups: dict[tuple, list[int]] = {}
        for i, ref in enumerate(self.qk_refs):
            if ref is not None:
                groups.setdefault((ref[0].shape, ref[1].shape, ref[2]), []).append(i)
        for (q_shape, _, causal), index in groups.items():
            rows = self._host_rows(q_shape[2])
            qs = [self.qk_refs[i][0] for i in index]
            ks = [self.qk_refs[i][1] for i in index]
            stats = kernels.attention(qs, ks, self.cfg.attn_batch, self.cfg.attn_heads, rows, causal)
            for i, pair in zip(index, stats.tolist(), strict=True):
                out[i] = pair
        self.qk_refs = [None] * len(self.blocks)

    def _read_args(self) -> None:
        """The attention of the kernel calls kept as they were in the forward: all blocks checked and read by one
        kernel call when they qualify, else each one looked at as the hook would have (refs, samples, at once)."""
        index = [i for i, args in enumerate(self.qk_args) if args is not None]
        calls = [self.qk_args[i] for i in index]
        self.qk_args = [None] * len(self.blocks)
        self._to_read["args"] = False
        stats = None
        if kernels.library() is not None:
            rows = self._host_rows(calls[0][0].shape[-2])
            stats = kernels.attention_of(calls, self.cfg.attn_batch, self.cfg.attn_heads, rows)
        if stats is not None:  # pairs of floats
            for i, pair in zip(index, stats, strict=True):
                self.qk_host[i] = pair
            return
        for i, args in zip(index, calls, strict=True):
            self._capture_qk(i, args)

    def attention(self) -> list:
        """Attention stats of the sampled rows (call before the weights change): per block None, a list of two
        floats (CPU kernels) or a device tensor pair."""
        to_read = self._to_read
        if self._state is not None:  # the C++ hooks' kept kernel calls: read in one call, or handed back here
            pairs, left = self._native.attention(self._state, self.cfg.attn_batch, self.cfg.attn_heads)
            for i, pair in enumerate(pairs):
                if pair is not None:
                    self.qk_host[i] = pair
            for block, args in left:
                self._capture_qk(block, args)
        if to_read["args"]:  # captured as they were in the forward
            self._read_args()
        out = self.qk_host
        self.qk_host = [None] * len(self.blocks)
        if to_read["refs"]:
            self._kernel_refs_attention(out)
        captured = [i for i, s in enumerate(self.qk_samples) if s is not None] if to_read["samples"] else ()
        if captured:
            with torch.no_grad():
                stats = kernel_attention_stats([self.qk_samples[i] for i in captured])
            for row, i in enumerate(captured):
                out[i] = stats[row]
            self.qk_samples = [None] * len(self.blocks)
        to_read["refs"] = to_read["samples"] = False
        if not to_read["inputs"]:
            return out
        to_read["inputs"] = False
        devices = [x.device for x in self.attn_inputs if x is not None and x.device.type == "cuda"]
        with torch.no_grad(), torch.random.fork_rng(devices=devices[:1]):
            for i, (module, x) in enumerate(zip(self.attn_modules, self.attn_inputs, strict=True)):
                if module is not None and x is not None:
                    cfg = self.cfg
                    out[i] = attention_stats(module, x, cfg.attn_heads, cfg.attn_positions, self.attn_doc_ids[i])
        self.attn_inputs = [None] * len(self.blocks)
        self.attn_doc_ids = [None] * len(self.blocks)
        return out

    def matrix(self, attention: list, device: torch.device, sync: bool = False, backward_scale=1.0):
        """[L+1, len(DEPTH_STATS)] float32; row l is boundary h_l, attention of block l-1.

        A numpy array when everything was measured on the CPU kernels (no torch op at all); with `sync`, a
        tensor on `device`; otherwise a Deferred: the raw device sums in one stacked tensor, finished on the
        host when collected (no small kernels, no host->device copy in the step). sync: combine the ranks of a
        data-parallel job (sums of squares and counts add up, maxima take the max, attention entropies
        average), so the numbers describe the global batch. backward_scale: the factor by which the backward
        pass was scaled relative to the true loss (data-parallel trainers multiply each rank's loss by the
        world size; fp16 loss scaling too); residual gradients are divided by it.
        """
        if self._holding or self._pending_acts:
            self._flush_activations()
        if self._state is not None:
            if (
                not sync
                and type(backward_scale) in (int, float)
                and self.resid_sumsq.count(None) == self.n  # the Python hooks measured nothing this step
                and self.act_sumsq.count(None) == self.n
            ):  # the usual step: the C++ hooks measured all, and write the matrix
                out = np.empty((self.n, len(DEPTH_STATS)), np.float32)
                spent = self._native.matrix(self._state, attention, float(backward_scale), out)
                if spent is not None:
                    self.clock.spent += spent
                    return out
            self._take_native()
        if sync:
            return self._device_matrix(attention, device, sync, backward_scale)
        sums = (self.resid_sumsq, self.act_sumsq, self.act_max)
        counts = list(self.act_count)
        host = isinstance(backward_scale, (int, float)) and all(
            v is None or isinstance(v, float) for column in sums for v in column
        )
        if host and all(a is None or type(a) is list for a in attention):  # the CPU kernels measured all
            return _depth_matrix(*sums, counts, attention, backward_scale)
        n, b = self.n, len(self.blocks)
        values = [*self.resid_sumsq, *self.act_sumsq, *self.act_max]
        for a in attention:
            values += [None, None] if a is None else [*a]
        values.append(backward_scale)
        stacked, fill = gather(values, device)

        def finish(raw: np.ndarray) -> np.ndarray:
            v = fill(raw)
            pairs = [v[3 * n + 2 * i : 3 * n + 2 * i + 2] for i in range(b)]
            return _depth_matrix(v[:n], v[n : 2 * n], v[2 * n : 3 * n], counts, pairs, v[-1])

        return finish(np.zeros(0)) if stacked is None else Deferred(stacked, finish)

    def _device_matrix(self, attention: list, device: torch.device, sync: bool, backward_scale) -> torch.Tensor:
        """The depth matrix on the device, combined over ranks (host values travel without waiting: fills,
        and copies that do not block)."""
        nan = torch.full((), float("nan"), device=device)
        zero = torch.zeros((), device=device)

        def as_tensor(v) -> torch.Tensor:
            if isinstance(v, torch.Tensor):
                return v.to(device).float().reshape(())
            return torch.tensor(v, dtype=torch.float32).to(device, non_blocking=True).reshape(())

        def column(values: list, fill: torch.Tensor) -> torch.Tensor:
            return torch.stack([fill if v is None else as_tensor(v) for v in values])

        seen = torch.tensor(
            [[v is not None for v in self.resid_sumsq], [v is not None for v in self.act_sumsq]], dtype=torch.float32
        ).to(device, non_blocking=True)
        sums = torch.stack([column(self.resid_sumsq, zero), column(self.act_sumsq, zero)])
        counts = torch.tensor(self.act_count, dtype=torch.float32).to(device, non_blocking=True)
        act_max = column(self.act_max, torch.full((), float("-inf"), device=device))
        att = torch.stack(
            [
                torch.as_tensor(a).float().to(device, non_blocking=True) if a is not None else torch.stack([nan, nan])
                for a in attention
            ]
        )
        att_seen = torch.isfinite(att[:, 0]).float()
        if sync:
            import torch.distributed as dist

            packed = torch.cat([sums.flatten(), counts, seen.flatten(), torch.nan_to_num(att[:, 0]), att_seen])
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
            maxima = torch.cat([act_max, torch.nan_to_num(att[:, 1], nan=float("-inf"))])
            dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
            n, b = self.n, len(self.blocks)
            sums, counts = packed[: 2 * n].view(2, n), packed[2 * n : 3 * n]
            seen = packed[3 * n : 5 * n].view(2, n)
            entropy = packed[5 * n : 5 * n + b] / packed[5 * n + b :].clamp_min(1)
            att_seen = packed[5 * n + b :]
            act_max, att = maxima[:n], torch.stack([entropy, maxima[n:]], dim=1)
        resid = (sums[0].sqrt() / backward_scale).where(seen[0] > 0, nan)
        act_rms = (sums[1] / counts.clamp_min(1)).sqrt().where(seen[1] > 0, nan)
        act_max = act_max.where(seen[1] > 0, nan)
        att = att.where(att_seen[:, None] > 0, nan)
        attn_rows = torch.cat([torch.full((1, 2), float("nan"), device=device), att])  # h_0 has no attention
        return torch.stack([resid, act_rms, act_max, attn_rows[:, 0], attn_rows[:, 1]], dim=1)


class LogitsProbe(_Probe):
    """Forward hook on the output head: max |z| and mean log-sum-exp over every position of the step."""

    def __init__(self, head: nn.Module, clock=None) -> None:
        self.clock = clock if clock is not None else _NoClock()
        self.armed = False
        self._reset()
        self._handles: list = []
        self._kept: dict[int, _Tap] = {}
        native = native_hooks_for([head])
        if native is not None:  # C++ (flowhooks.cpp); anything but plain CPU float32 logits comes to _measure
            self._native = native
            # no boundaries, blocks or fallbacks of the depth probe's: only the logits' (measure)
            self._state = native.probe(0, 0, None, None, self._measure, None, None, kernels._PLAIN, 0)
            self._plan = [(head, "forward", _NativeHook(native.on_logits, self._state))]
        else:
            self._plan = [(head, "forward", self._on_output)]

    def _reset(self) -> None:
        self.max_abs: torch.Tensor | None = None
        self.lse_sum: torch.Tensor | None = None
        self.rows = 0

    def _on_output(self, module, args, output) -> None:
        z = _first_tensor(output)
        if not self.armed or z is None or not torch.is_grad_enabled():
            return
        started = time.perf_counter()
        self._measure(z)
        self.clock.spent += time.perf_counter() - started

    def _measure(self, z: torch.Tensor) -> None:
        if _on_kernels(z):  # one pass while the logits are in cache; Python floats
            mx, lse, rows = kernels.logits(z)
        else:
            with torch.no_grad():
                z = z.detach()
                mx = tensorstats.max_abs_one(z)
                lse = torch.logsumexp(z.float(), dim=-1).sum()
            rows = math.prod(z.shape[:-1])
        self.max_abs = _max(self.max_abs, mx)
        self.lse_sum = _add(self.lse_sum, lse)
        self.rows += rows

    def values(self, device: torch.device, sync: bool = False) -> torch.Tensor | np.ndarray | Deferred:
        """[max |z|, mean lse] float32 (NaN when nothing was seen): numpy when measured by the CPU kernels, a
        Deferred when measured on the device (finished on the host); `sync`: over all ranks, on the device."""
        if self._state is not None:
            mx, lse, rows, spent = self._native.take_logits(self._state)
            if mx is not None:
                self.max_abs, self.lse_sum = _max(self.max_abs, mx), _add(self.lse_sum, lse)
                self.rows += rows
            self.clock.spent += spent
        if self.max_abs is None and not sync:
            return np.full(2, np.nan, dtype=np.float32)
        if not sync and isinstance(self.max_abs, float) and isinstance(self.lse_sum, float):  # the CPU kernels
            return np.array([self.max_abs, self.lse_sum / max(self.rows, 1)], dtype=np.float32)
        if not sync:
            rows = max(self.rows, 1)
            stacked, fill = gather([self.max_abs, self.lse_sum], device)

            def finish(raw: np.ndarray) -> np.ndarray:
                mx, lse = fill(raw)
                return np.array([mx, lse / rows], dtype=np.float32)

            return finish(np.zeros(0)) if stacked is None else Deferred(stacked, finish)

        def as_tensor(v, fill: float) -> torch.Tensor:
            return torch.as_tensor(fill if v is None else v, device=device).float().reshape(())

        import torch.distributed as dist

        mx, lse = as_tensor(self.max_abs, float("-inf")), as_tensor(self.lse_sum, 0.0)
        totals = torch.stack([lse, torch.full((), float(self.rows), device=device)])  # a fill, not a copy
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        dist.all_reduce(mx, op=dist.ReduceOp.MAX)
        lse, rows = totals[0], totals[1]
        seen = rows > 0  # on the device: no rank waits for a host check
        return torch.stack([mx.where(seen, float("nan")), (lse / rows.clamp_min(1)).where(seen, float("nan"))])
