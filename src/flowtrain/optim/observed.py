"""Adam and AdamW that report the update they make: torch's fused CPU step, bit for bit, with the statistics of
the update computed in the same pass over memory.

Why: the microscope's update norm ||ΔW|| (and ||ΔW||/||W||) needs the weights before and after the step. Beside
torch's optimizer that costs a copy of every parameter (memory) and a pass after each step that reads the
weights, the copy and Adam's v and writes the copy: on a 12-layer, 768-wide model on a 2-core CPU ~50 ms of a
1.4 s step. The optimizer holds the weights before and after in registers anyway; here its pass also sums
||W before||^2, ||ΔW||^2, ||W after||^2 and sum(v) (flowtrain/kernels/flowstats.cpp, ft_adam_step).

Safety first: a step is taken by our kernel only where it is bit-identical to torch's fused kernel, which it
replicates operation for operation (including where torch's compiler fused multiply-adds): CPU float32
contiguous parameters; no amsgrad, maximize, capturable, differentiable or grad scaling; float learning rates;
and a check when the optimizer is built that runs both kernels for a few steps on tensors of every remainder
size with this optimizer's betas, eps and weight decays and compares every bit of the weights and moments.
Anything else, or a torch whose kernel rounds differently, takes torch's own fused step (`observing` is False
and `observing_note` says why); the microscope then measures the update its own way. State, state_dict and
checkpoints are torch's Adam/AdamW's, unchanged. FLOWTRAIN_KERNELS=0 (no CPU kernels at all) runs torch's step.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np
import torch

from flowtrain import kernels

CHECK_SIZES = (*range(1, 41), 1000, 16385)  # every remainder modulo 16 and 8, a multi-chunk tensor
CHECK_STEPS = 3


class Update(NamedTuple):
    """What an observing optimizer can say about its last step (see update_since)."""

    status: Literal["none", "measured", "unmeasured"]
    figures: np.ndarray | None = None  # [n, 4]: ||W before||^2, ||ΔW||^2, ||W after||^2, sum(v)
    stepped: np.ndarray | None = None  # [n] bool: the tensors the step touched
    all_stepped: bool = False  # stepped.all(), as a Python bool (the common case, tested without numpy)


class _Lookup(NamedTuple):
    """update_since's cached answer to "which of our rows is each queried tensor"."""

    params: list  # the queried list (recognized by identity)
    rows: dict  # our id(param) -> row mapping it was made for (identity too)
    key: tuple  # (ids of params, rows): compared when either object is new
    where: np.ndarray  # our row of each queried tensor, -1 where we did not step it
    stepped: np.ndarray  # where >= 0
    all_stepped: bool
    in_order: bool  # where is 0, 1, ..., n-1: our rows are the queried tensors' rows as they are


def _simd_width() -> int:
    """Floats per vector in torch's CPU kernels (where its fused Adam's scalar remainder begins)."""
    return 16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 8


class _Observing:
    """Mixin over torch.optim.Adam/AdamW (fused=True): step() with statistics, or torch's step."""

    decoupled: bool

    def _setup_observing(self) -> None:
        self.steps_taken = 0  # every step that changed the weights, ours or torch's (see update_since)
        self.last_update: tuple[int, dict[int, int], np.ndarray] | None = None  # step, id(param) -> row, [n, 4]
        self._lookup: _Lookup | None = None  # update_since's cached row of each queried tensor
        self._vec = _simd_width()
        self.observing_note = self._why_not()
        if not self.observing_note and not self._bitwise_like_torch():
            self.observing_note = "this torch's fused Adam kernel rounds differently from flowtrain's"
        self.observing = not self.observing_note

    def _recheck(self) -> None:
        """Groups changed (add_param_group, load_state_dict can bring amsgrad or other betas): check again; once
        off, torch's step for good."""
        if getattr(self, "observing", False):
            note = self._why_not() or ("" if self._bitwise_like_torch() else "a new group's step rounds differently")
            if note:
                self.observing, self.observing_note = False, note

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._recheck()

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._recheck()

    def _why_not(self) -> str:
        if kernels.library() is None:
            return f"no CPU kernels ({kernels.build_error})"
        for group in self.param_groups:
            for flag in ("amsgrad", "maximize", "capturable", "differentiable"):
                if group.get(flag):
                    return f"{flag}=True"
            if not group.get("fused") or not isinstance(group["lr"], float):
                return "not fused, or a tensor learning rate"
            if bool(group.get("decoupled_weight_decay", self.decoupled)) != self.decoupled:
                return "decoupled_weight_decay differs from the class's"
            for p in group["params"]:
                if not (p.dtype is torch.float32 and p.is_cpu and p.is_contiguous() and type(p) is torch.nn.Parameter):
                    return "not every parameter is a plain contiguous CPU float32 tensor"
        return ""

    def _bitwise_like_torch(self) -> bool:
        """Run torch's fused kernel and ours side by side on fresh tensors, for every (betas, eps, weight decay)
        of the groups and with no decay (each takes other branches); True if every bit agrees."""
        generator = torch.Generator().manual_seed(0)
        torch_cls = torch.optim.AdamW if self.decoupled else torch.optim.Adam
        settings = {
            (tuple(g["betas"]), float(g["eps"]), wd) for g in self.param_groups for wd in (0.0, g["weight_decay"])
        }
        lr = float(self.param_groups[0]["lr"]) or 1e-3
        for betas, eps, weight_decay in sorted(settings):
            ours = [torch.randn(n, generator=generator) for n in CHECK_SIZES]
            theirs = [torch.nn.Parameter(t.clone()) for t in ours]
            reference = torch_cls(theirs, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
            exp_avgs = [torch.zeros_like(t) for t in ours]
            exp_avg_sqs = [torch.zeros_like(t) for t in ours]
            for step in range(1, CHECK_STEPS + 1):
                grads = [torch.randn(t.shape, generator=generator) * 10.0 ** (step - 2) for t in ours]
                for p, g in zip(theirs, grads, strict=True):
                    p.grad = g.clone()
                reference.step()
                rows = np.array([[lr, weight_decay, float(step)]] * len(ours)).T
                kernels.adam_step(ours, grads, exp_avgs, exp_avg_sqs, rows, betas, eps, self.decoupled, self._vec)
            for mine, p, m, v in zip(ours, theirs, exp_avgs, exp_avg_sqs, strict=True):
                state = reference.state[p]
                pairs = ((mine, p), (m, state["exp_avg"]), (v, state["exp_avg_sq"]))
                if not all(torch.equal(a, b) for a, b in pairs):
                    return False
        return True

    def step(self, closure=None):
        """Our kernel's step (torch's fused arithmetic plus the update's figures), else torch's own. Not under
        torch.no_grad: nothing here records autograd history (the kernel writes the tensors' memory; step counts
        and new state need no graph), and entering and leaving it cost ~0.1 ms a step in the training loop on
        a 2-core CPU (opt.step 1.27-1.31 -> 1.13-1.19 ms); torch's step sets its own grad mode."""
        if not self.observing or closure is not None or getattr(self, "grad_scale", None) is not None:
            return self._torch_step(closure)
        params, grads, exp_avgs, exp_avg_sqs, steps, hyper = [], [], [], [], [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.dtype is not torch.float32 or p.grad.is_sparse:
                    return self._torch_step(closure)
                state = self.state[p]
                if not state:  # as torch's fused Adam initializes it
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad.contiguous())  # torch's kernel reads grad.contiguous() too
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
                hyper.append((group["lr"], group["weight_decay"], tuple(group["betas"]), group["eps"]))
        found_inf = getattr(self, "found_inf", None)
        if not params or (found_inf is not None and bool(found_inf)):  # a skipped step changes nothing
            return None
        torch._foreach_add_(steps, 1)
        rows = np.array([[lr, wd, float(s)] for (lr, wd, _, _), s in zip(hyper, steps, strict=True)]).T
        by_betas: dict[tuple, list[int]] = {}
        for i, (_, _, betas, eps) in enumerate(hyper):
            by_betas.setdefault((betas, eps), []).append(i)
        out = np.empty((len(params), 4))
        for (betas, eps), index in by_betas.items():

            def pick(xs: list, index=index) -> list:
                return xs if len(index) == len(xs) else [xs[i] for i in index]

            out[index] = kernels.adam_step(
                pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs), rows[:, index], betas, eps,
                self.decoupled, self._vec,
            )  # fmt: skip
        self.steps_taken += 1
        ids = {id(p): i for i, p in enumerate(params)}
        if self.last_update is not None and self.last_update[1] == ids:
            ids = self.last_update[1]  # the same tensors as last step: keep the mapping (update_since caches on it)
        self.last_update = (self.steps_taken, ids, out)
        return None

    def _torch_step(self, closure):
        """torch's own fused step: counted, so a reader of update_since() knows it has no statistics for it."""
        loss = super().step(closure)
        found_inf = getattr(self, "found_inf", None)
        skipped = found_inf is not None and bool(found_inf)
        if not skipped and any(p.grad is not None for group in self.param_groups for p in group["params"]):
            self.steps_taken += 1
        return loss

    def update_since(self, params: list[torch.Tensor], since: int) -> Update:
        """What happened to `params` since steps_taken was `since`: no step ("none"); exactly one step, by our
        kernel ("measured": the figures of the tensors it stepped, NaN rows for those it did not touch, having
        no gradient); anything else ("unmeasured"). A caller that asks with the same list object every step
        (the monitor does) must not change it in place: it is recognized by identity, not reread. The figures
        may be the step's own array (when our rows are the queried tensors in their order): read them only."""
        if self.steps_taken == since:
            return Update("none")
        if self.last_update is None or self.steps_taken != since + 1 or self.last_update[0] != self.steps_taken:
            return Update("unmeasured")
        _, rows, out = self.last_update
        lookup = self._lookup
        if lookup is None or lookup.params is not params or lookup.rows is not rows:  # else known by identity
            key = (tuple(map(id, params)), rows)  # ids of live tensors: equal ids are the same tensors
            if lookup is None or lookup.key != key:  # which row of ours is each of `params`
                where = np.array([rows.get(id(p), -1) for p in params], dtype=np.int64)
                in_order = len(where) == len(out) and bool((where == np.arange(len(out))).all())
                lookup = _Lookup(params, rows, key, where, where >= 0, bool((where >= 0).all()), in_order)
            self._lookup = lookup = lookup._replace(params=params, rows=rows)
        if lookup.in_order:  # the step's own array: made for this step, never written again (no copy)
            return Update("measured", out, lookup.stepped.copy(), True)
        figures = out[lookup.where]  # rows of tensors we did not step are overwritten with NaN below
        if not lookup.all_stepped:
            figures[~lookup.stepped] = np.nan
        return Update("measured", figures, lookup.stepped.copy(), lookup.all_stepped)


class ObservedAdamW(_Observing, torch.optim.AdamW):
    decoupled = True

    def __init__(self, params, **kwargs):
        super().__init__(params, fused=True, **kwargs)
        self._setup_observing()


class ObservedAdam(_Observing, torch.optim.Adam):
    decoupled = False

    def __init__(self, params, **kwargs):
        super().__init__(params, fused=True, **kwargs)
        self._setup_observing()


def observed_class(cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer] | None:
    """The observing twin of torch's Adam or AdamW (None for other optimizers)."""
    return {torch.optim.AdamW: ObservedAdamW, torch.optim.Adam: ObservedAdam}.get(cls)
