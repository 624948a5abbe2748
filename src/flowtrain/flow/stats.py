"""Per-parameter-tensor statistics: gradients, weights, the update that actually happened, Adam's second moment.

Results are one [n_tensors] vector per statistic: float64 numpy arrays when the CPU kernels measured them
(flowtrain.kernels: no torch op at all), else float32 tensors on the device (torch's fused multi-tensor
kernels via flowtrain.tensorstats, shard-aware). Either way the monitor moves everything to the host in one go
and builds the per-tensor table there (per_tensor_matrix, numpy).

The update ΔW is measured, not reconstructed from the optimizer's formula: a copy of the weights from before
the step is subtracted from the weights after it. That is exact for any optimizer and costs one extra copy of
the parameters in memory.

On the CPU kernels everything about the weights is one pass after the step: ||W_after - copy||^2,
||W_after||^2, Adam's sum(v), and the copy refreshed to W_after when the next step is monitored too. The next
step's "weights before" are then already known and copied, unless something else wrote to the weights in
between (a rollback, a checkpoint load, a user's in-place edit): every such write bumps the parameters'
version counters, which we compare, and `invalidate()` forces a fresh copy. Elsewhere (GPUs, DTensor shards)
the copy is taken before the step (_foreach_copy_) and subtracted after it (_foreach_sub_).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from flowtrain import kernels, tensorstats
from flowtrain.flow.deferred import Deferred

# Column order of the per-tensor matrix; also the per-tensor / per-layer stat columns of flow.parquet.
TENSOR_STATS = (
    "grad_norm",
    "grad_max_abs",
    "grad_rms",
    "grad_nonfinite",
    "weight_norm",
    "update_norm",
    "update_ratio",
    "adam_v_rms",
)

Vector = torch.Tensor | np.ndarray  # one value per parameter tensor


class ParamStats:
    """Statistics over a fixed, named list of parameters of one model/optimizer pair."""

    def __init__(self, names: Sequence[str], params: Sequence[torch.nn.Parameter], optimizer, keep_updates: bool):
        self.names = list(names)
        self.params = list(params)
        self.optimizer = optimizer
        self.keep_updates = keep_updates
        # an optimizer that measures its own update in its pass (optim/observed.py): no copy, no pass of ours
        self.observer = optimizer if getattr(optimizer, "observing", False) else None
        self._since = 0  # the observer's steps_taken before this step
        self._snapshot: list[torch.Tensor] | None = None
        if keep_updates and self.observer is None:
            with torch.no_grad():
                # this rank's pieces (FSDP2 shards are DTensors, which foreach copies do not take)
                self._snapshot = [torch.empty_like(tensorstats.local(p.detach())) for p in self.params]
        self._adam_index: list[int] | None = None
        self._adam_key: tuple[int, int] | None = None
        self._adam_numels: torch.Tensor | None = None
        # CPU kernels: the weights' sums of squares and version counters when the copy was last refreshed by
        # the pass after a step (None: take a fresh copy before the next step)
        self.fast = bool(self.params) and kernels.takes(self.params + (self._snapshot or []))
        self._np_numels = np.array([p.numel() for p in self.params], dtype=np.int64)
        self._np_numels_at_least_1 = np.maximum(self._np_numels, 1)
        self._fresh: tuple[list[int], np.ndarray] | None = None
        self._no_nonfinite = np.zeros(len(self.params))  # grad_nonfinite of a finite step (read only)
        self._no_nonfinite.flags.writeable = False

    @property
    def np_numels(self) -> np.ndarray:
        """Elements per tensor, int64 on the host."""
        return self._np_numels

    @property
    def device(self) -> torch.device:
        return self.params[0].device if self.params else torch.device("cpu")

    def _nan(self) -> torch.Tensor:
        return torch.full((len(self.params),), float("nan"), device=self.device)

    def invalidate(self) -> None:
        """The weights were replaced behind the optimizer's back: take a fresh copy before the next step."""
        self._fresh = None

    def _versions(self) -> list[int]:
        return [p._version for p in self.params]

    # -- before the optimizer step --------------------------------------------------------------------------

    def weights_and_snapshot(self) -> Vector:
        """Sum of squares of the weights as they are before the step (per tensor); keep a copy for ΔW. With an
        observing optimizer: None (its step measures them)."""
        if self.observer is not None:
            self._since = self.observer.steps_taken
            return None
        if self.fast:
            if self._fresh is not None and self._fresh[0] == self._versions():
                return self._fresh[1]  # measured and copied by the last step's pass
            self._fresh = None
            return kernels.weights(self.params, self._snapshot, self._np_numels)
        with torch.no_grad():
            sq = tensorstats.sums_of_squares(self.params)
            if self._snapshot is not None:
                torch._foreach_copy_(self._snapshot, [tensorstats.local(p.detach()) for p in self.params])
        return sq

    def grad_stats(self) -> dict:
        """grad_sumsq, grad_max_abs, grad_nonfinite per tensor (NaN where a parameter has no grad); with
        "complete" (every parameter has a gradient) also "clip_sumsq": the float32 tensor of sums of squares
        that tensorstats.sums_of_squares would give the clipper, bit for bit.

        The kernels' paths read memory only and need no autograd guard; only torch's path runs under no_grad
        (entering and leaving it costs ~50 us in the training loop on a 2-core CPU, where its Python is cold)."""
        if self.fast:  # the usual case on the CPU: every gradient there and plain, found in the kernel's call
            found = kernels.grad_sumsq_maxabs(self.params)
            if found is not None:
                sq, mx, clip, finite = found  # clip: float32, as sums_of_squares gives it
                bad = self._no_nonfinite if finite else kernels.nonfinite([p.grad for p in self.params]) * 1.0
                out = {"grad_sumsq": sq, "grad_max_abs": mx, "grad_nonfinite": bad}
                return {**out, "clip_sumsq": clip, "complete": True}
        with torch.no_grad():
            return self._grad_stats()

    def _grad_stats(self) -> dict:
        present = [i for i, p in enumerate(self.params) if p.grad is not None]
        grads = [self.params[i].grad for i in present]
        complete = len(present) == len(self.params)
        if grads and kernels.takes(grads):
            sq, mx = kernels.sumsq_maxabs(grads, self._np_numels if complete else None)
            bad = kernels.nonfinite(grads).astype(np.float64) if not np.isfinite(sq).all() else np.zeros_like(sq)
            out = {"grad_sumsq": sq, "grad_max_abs": mx.astype(np.float64), "grad_nonfinite": bad}
            if complete:
                return {**out, "clip_sumsq": torch.from_numpy(sq.astype(np.float32)), "complete": True}
            for key, values in out.items():
                full = np.full(len(self.params), np.nan)
                full[present] = values
                out[key] = full
            return {**out, "complete": False}
        sq, mx = tensorstats.sumsq_and_max_abs(grads)
        bad = self._nonfinite(grads, sq)
        if complete:
            return {"grad_sumsq": sq, "grad_max_abs": mx, "grad_nonfinite": bad, "clip_sumsq": sq, "complete": True}
        index = torch.tensor(present, dtype=torch.long).to(self.device, non_blocking=True)  # no wait for the device
        out = {}
        for key, values in (("grad_sumsq", sq), ("grad_max_abs", mx), ("grad_nonfinite", bad)):
            full = self._nan()
            full[index] = values
            out[key] = full
        out["complete"] = False  # NaN-filled: not the sums of squares of the gradients present
        return out

    @staticmethod
    def _nonfinite(grads: list[torch.Tensor], sumsq: torch.Tensor) -> torch.Tensor:
        """Non-finite counts per tensor. A NaN/Inf element makes its tensor's sum of squares non-finite, so on
        the CPU (where reading a value costs no device sync) we count only when some sum is non-finite and
        skip ~5 elementwise passes per gradient otherwise. On accelerators we always count: device work is
        cheap there and a host check would stall the step."""
        if sumsq.device.type == "cpu" and bool(torch.isfinite(sumsq).all()):
            return torch.zeros_like(sumsq)
        return tensorstats.nonfinite_counts(grads)

    # -- after the optimizer step ---------------------------------------------------------------------------

    def after_step(self, keep_for_next: bool) -> tuple[Vector | None, Vector, Vector | None]:
        """(per-tensor ||ΔW||^2 or None when updates are off, Adam's RMS(v) per tensor, and with an observing
        optimizer the weights' sums of squares before the step) after an optimizer step.

        keep_for_next: the next step is monitored too; on the CPU kernels the same pass then refreshes the
        copy of the weights (and their sums of squares) for it.
        """
        if self.observer is not None:
            return self._observed()
        if not self.fast:  # torch's path (update_sumsq and adam_v_rms run under no_grad)
            return self.update_sumsq(), self.adam_v_rms(), None
        index, vs = self._adam_tensors()
        vs_fast = bool(vs) and kernels.takes(vs)
        if self._snapshot is None:
            v_sums = kernels.sums(vs) if vs_fast else None
            return None, self._host_v_rms(index, v_sums) if vs_fast or not vs else self.adam_v_rms(), None
        aligned: list[torch.Tensor | None] | None = None
        if vs_fast:
            aligned = [None] * len(self.params)
            for i, v in zip(index, vs, strict=True):
                aligned[i] = v
        out = kernels.update(self.params, self._snapshot, aligned, self._np_numels, copy=keep_for_next)
        self._fresh = (self._versions(), out[:, 1]) if keep_for_next else None
        if vs and not vs_fast:
            return out[:, 0], self.adam_v_rms(), None
        return out[:, 0], self._host_v_rms(index, out[index, 2] if vs else None), None

    def _observed(self) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """The observing optimizer's figures of this step. Tensors it did not step (no gradient), and all of them
        when it took no step (the guard skipped it), did not move: ΔW = 0 and one pass measures their ||W||
        and sum(v). A step it could not measure (torch's own, e.g. with a closure): ΔW is unknown (NaN) and ||W||
        is read after the step."""
        update = self.observer.update_since(self.params, self._since)
        if update.all_stepped and len(self._adam_indices()) == len(self.params):  # the usual step: one row each
            rows = update.figures
            v_rms = np.sqrt(rows[:, 3] / self._np_numels_at_least_1)
            return (rows[:, 1] if self.keep_updates else None), v_rms, rows[:, 0]
        n = len(self.params)
        rows = update.figures if update.status == "measured" else np.full((n, 4), np.nan)
        stepped = update.stepped if update.status == "measured" else np.zeros(n, dtype=bool)
        index = self._adam_indices()
        still = np.flatnonzero(~stepped) if update.status != "measured" or not stepped.all() else ()
        if len(still):  # not stepped, or unmeasured: read as they are now
            rows[still, 0] = rows[still, 2] = kernels.weights(
                [self.params[i] for i in still], None, self._np_numels[still]
            )
            if update.status != "unmeasured":
                rows[still, 1] = 0.0  # they did not move
            has_v = set(index)
            with_v = [i for i in still if i in has_v]
            if with_v:
                rows[with_v, 3] = kernels.sums([self.optimizer.state[self.params[i]]["exp_avg_sq"] for i in with_v])
        usq = rows[:, 1] if self.keep_updates else None
        return usq, self._host_v_rms(index, rows[index, 3] if index else None), rows[:, 0]

    def _host_v_rms(self, index: list[int], v_sums: np.ndarray | None) -> np.ndarray:
        if v_sums is not None and len(index) == len(self.params):  # every tensor has a v (Adam): one division
            return np.sqrt(v_sums / self._np_numels_at_least_1)
        out = np.full(len(self.params), np.nan)
        if v_sums is not None:
            out[index] = np.sqrt(v_sums / np.maximum(self._np_numels[index], 1))
        return out

    @torch.no_grad()
    def update_sumsq(self) -> torch.Tensor | None:
        """Per-tensor ||W_before - W_after||^2 of the step that just happened (None when updates are off)."""
        if self._snapshot is None:
            return None
        torch._foreach_sub_(self._snapshot, [tensorstats.local(p.detach()) for p in self.params])
        return tensorstats.sums_of_squares(self._snapshot, shards_of=self.params)

    def _adam_indices(self) -> list[int]:
        """The tensors the optimizer keeps a second moment for (recounted when its state grows)."""
        state = self.optimizer.state if self.optimizer is not None else {}
        key = (len(state), id(self.optimizer))
        if self._adam_index is None or self._adam_key != key:
            self._adam_index = [
                i for i, p in enumerate(self.params) if isinstance(state.get(p), dict) and "exp_avg_sq" in state[p]
            ]
            self._adam_key = key
        return self._adam_index

    def _adam_tensors(self) -> tuple[list[int], list[torch.Tensor]]:
        index = self._adam_indices()
        return index, [self.optimizer.state[self.params[i]]["exp_avg_sq"] for i in index]

    @torch.no_grad()
    def adam_v_rms(self) -> torch.Tensor:
        """sqrt(mean(exp_avg_sq)) per tensor (= RMS of sqrt(v), Adam's per-element step denominator, without
        bias correction), NaN for tensors the optimizer keeps no second moment for."""
        index, vs = self._adam_tensors()
        out = self._nan()
        if not vs:
            return out
        if self._adam_numels is None or len(self._adam_numels) != len(index):
            numels = [float(self.params[i].numel()) for i in index]  # of the whole tensors, also when sharded
            self._adam_numels = torch.tensor(numels, device=self.device).clamp_min(1)
        means = tensorstats.sums_of_nonnegative(vs).to(self.device) / self._adam_numels
        if len(index) == len(self.params):
            return means.sqrt()
        out[torch.tensor(index, dtype=torch.long).to(self.device, non_blocking=True)] = means.sqrt()
        return out

    # -- assembling ------------------------------------------------------------------------------------------

    def deferred_table(
        self, grads: dict | None, weight_sumsq: Vector, update_sumsq: Vector | None, adam: Vector | None
    ) -> np.ndarray | Deferred:
        """per_tensor_matrix, finished on the host: the device vectors travel stacked (one launch), the
        arithmetic runs in numpy after the transfer. numpy right away when nothing is on the device."""
        named = {"weight_sumsq": weight_sumsq, "update_sumsq": update_sumsq, "adam": adam}
        if grads:
            named.update({k: grads[k] for k in ("grad_sumsq", "grad_max_abs", "grad_nonfinite")})
        host: dict[str, np.ndarray | None] = {}
        on_device: list[tuple[str, torch.Tensor]] = []
        for key, v in named.items():
            if isinstance(v, torch.Tensor) and v.device.type != "cpu":
                on_device.append((key, v))
            else:
                host[key] = v.numpy() if isinstance(v, torch.Tensor) else v

        def finish(raw: np.ndarray) -> np.ndarray:
            values = {**host, **{key: raw[i].astype(np.float64) for i, (key, _) in enumerate(on_device)}}
            g = {k: values[k] for k in ("grad_sumsq", "grad_max_abs", "grad_nonfinite")} if grads else None
            return self.per_tensor_matrix(g, values["weight_sumsq"], values["update_sumsq"], values["adam"])

        if not on_device:
            return finish(np.zeros((0, len(self.params))))
        return Deferred(torch.stack([v.float() for _, v in on_device]), finish)

    def per_tensor_matrix(
        self,
        grads: dict | None,
        weight_sumsq: np.ndarray,
        update_sumsq: np.ndarray | None,
        adam: np.ndarray | None,
    ) -> np.ndarray:
        """[n_tensors, len(TENSOR_STATS)] in TENSOR_STATS column order, from host vectors (the definition the
        tables kernel reproduces; device numbers come here after the transfer, see deferred_table)."""
        nan = np.full(len(self.params), np.nan)
        with np.errstate(divide="ignore", invalid="ignore"):  # 0/0 is NaN, as in torch
            weight_norm = np.sqrt(weight_sumsq)
            update_norm = np.sqrt(update_sumsq) if update_sumsq is not None else nan
            columns = {
                "weight_norm": weight_norm,
                "update_norm": update_norm,
                "update_ratio": update_norm / weight_norm,
                "adam_v_rms": adam if adam is not None else nan,
            }
            if grads:
                columns["grad_norm"] = np.sqrt(grads["grad_sumsq"])
                columns["grad_max_abs"] = grads["grad_max_abs"]
                columns["grad_rms"] = np.sqrt(grads["grad_sumsq"] / self._np_numels.clip(1))
                columns["grad_nonfinite"] = grads["grad_nonfinite"]
        return np.stack([columns.get(k, nan) for k in TENSOR_STATS], 1)
