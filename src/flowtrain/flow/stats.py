"""Per-parameter-tensor statistics: gradients, weights, the update that actually happened, Adam's second moment.

All reductions go through flowtrain.tensorstats (fused, shard-aware); results stay on the device as one
[n_tensors] float32 vector per statistic, so the monitor can move everything to the host in one transfer.

The update ΔW is measured, not reconstructed from the optimizer's formula: before the step we copy the weights
into preallocated buffers (one fused _foreach_copy_), after the step we subtract the new weights in place
(_foreach_sub_) and take norms. That is exact for any optimizer, costs one extra copy of the parameters in
memory and two fused passes per step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flowtrain import tensorstats

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


class ParamStats:
    """Statistics over a fixed, named list of parameters of one model/optimizer pair."""

    def __init__(self, names: Sequence[str], params: Sequence[torch.nn.Parameter], optimizer, keep_updates: bool):
        self.names = list(names)
        self.params = list(params)
        self.optimizer = optimizer
        self.numels = tensorstats.numels(self.params)
        self._snapshot: list[torch.Tensor] | None = None
        if keep_updates:
            with torch.no_grad():
                # this rank's pieces (FSDP2 shards are DTensors, which foreach copies do not take)
                self._snapshot = [torch.empty_like(tensorstats.local(p.detach())) for p in self.params]
        self._adam_index: list[int] | None = None
        self._adam_key: tuple[int, int] | None = None
        self._adam_numels: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.params[0].device if self.params else torch.device("cpu")

    def _nan(self) -> torch.Tensor:
        return torch.full((len(self.params),), float("nan"), device=self.device)

    # -- before the optimizer step --------------------------------------------------------------------------

    @torch.no_grad()
    def weights_and_snapshot(self) -> torch.Tensor:
        """Sum of squares of the weights as they are before the step (per tensor); keep a copy for ΔW."""
        sq = tensorstats.sums_of_squares(self.params)
        if self._snapshot is not None:
            torch._foreach_copy_(self._snapshot, [tensorstats.local(p.detach()) for p in self.params])
        return sq

    @torch.no_grad()
    def grad_stats(self) -> dict[str, torch.Tensor]:
        """grad sum of squares, max |g| and non-finite count per tensor (NaN where a parameter has no grad)."""
        present = [i for i, p in enumerate(self.params) if p.grad is not None]
        grads = [self.params[i].grad for i in present]
        sq = tensorstats.sums_of_squares(grads)
        mx = tensorstats.max_abs(grads)
        bad = self._nonfinite(grads, sq)
        if len(present) == len(self.params):
            return {"grad_sumsq": sq, "grad_max_abs": mx, "grad_nonfinite": bad, "complete": True}
        index = torch.tensor(present, dtype=torch.long, device=self.device)
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

    @torch.no_grad()
    def update_sumsq(self) -> torch.Tensor | None:
        """Per-tensor ||W_before - W_after||^2 of the step that just happened (None when updates are off)."""
        if self._snapshot is None:
            return None
        torch._foreach_sub_(self._snapshot, [tensorstats.local(p.detach()) for p in self.params])
        return tensorstats.sums_of_squares(self._snapshot, shards_of=self.params)

    def _adam_tensors(self) -> tuple[list[int], list[torch.Tensor]]:
        state = self.optimizer.state if self.optimizer is not None else {}
        key = (len(state), id(self.optimizer))
        if self._adam_index is None or self._adam_key != key:
            self._adam_index = [
                i for i, p in enumerate(self.params) if isinstance(state.get(p), dict) and "exp_avg_sq" in state[p]
            ]
            self._adam_key = key
        return self._adam_index, [state[self.params[i]]["exp_avg_sq"] for i in self._adam_index]

    @torch.no_grad()
    def adam_v_rms(self) -> torch.Tensor:
        """sqrt(mean(exp_avg_sq)) per tensor (= RMS of sqrt(v), Adam's per-element step denominator, without
        bias correction), NaN for tensors the optimizer keeps no second moment for."""
        index, vs = self._adam_tensors()
        out = self._nan()
        if not vs:
            return out
        if self._adam_numels is None or len(self._adam_numels) != len(vs):
            self._adam_numels = tensorstats.numels(vs).clamp_min(1)
        means = tensorstats.sums(vs) / self._adam_numels
        if len(index) == len(self.params):
            return means.sqrt()
        out[torch.tensor(index, dtype=torch.long, device=self.device)] = means.sqrt()
        return out

    # -- assembling ------------------------------------------------------------------------------------------

    def per_tensor_matrix(
        self,
        grads: dict[str, torch.Tensor] | None,
        weight_sumsq: torch.Tensor,
        update_sumsq: torch.Tensor | None,
        adam: torch.Tensor | None,
    ) -> torch.Tensor:
        """[n_tensors, len(TENSOR_STATS)] float32 on the device, in TENSOR_STATS column order."""
        nan = self._nan()
        weight_norm = weight_sumsq.sqrt()
        update_norm = update_sumsq.sqrt() if update_sumsq is not None else nan
        columns = {
            "weight_norm": weight_norm,
            "update_norm": update_norm,
            "update_ratio": update_norm / weight_norm,
            "adam_v_rms": adam if adam is not None else nan,
        }
        if grads is not None:
            columns["grad_norm"] = grads["grad_sumsq"].sqrt()
            columns["grad_max_abs"] = grads["grad_max_abs"]
            columns["grad_rms"] = (grads["grad_sumsq"] / self.numels.clamp_min(1)).sqrt()
            columns["grad_nonfinite"] = grads["grad_nonfinite"]
        return torch.stack([columns.get(k, nan) for k in TENSOR_STATS], dim=1)
