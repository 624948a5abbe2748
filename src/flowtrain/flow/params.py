"""Per-parameter-tensor statistics: gradients, weights, the update that actually happened, Adam's second moment.

Every reduction goes through flowtrain.tensorstats (fused multi-tensor torch ops, complete over FSDP2 shards)
and stays on the device. The update ΔW is measured, not reconstructed from the optimizer's formula: a copy
of the weights taken before the step is subtracted from the weights after it, which is exact for any
optimizer and costs one copy of the parameters in memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flowtrain import tensorstats

# rows of the raw [6, n_tensors] matrix a monitored step leaves on the device (NaN where not measured)
RAW_ROWS = ("grad_sumsq", "grad_max_abs", "grad_nonfinite", "weight_sumsq", "update_sumsq", "adam_v_sum")


class ParamStats:
    """Statistics over a fixed, named list of parameters of one model/optimizer pair."""

    def __init__(self, params: Sequence[torch.nn.Parameter], optimizer, keep_updates: bool) -> None:
        self.params = list(params)
        self.optimizer = optimizer
        self.device = self.params[0].device if self.params else torch.device("cpu")
        self._snapshot: list[torch.Tensor] | None = None
        if keep_updates:
            with torch.no_grad():  # this rank's pieces: foreach copies do not take DTensors
                self._snapshot = [torch.empty_like(tensorstats.local(p.detach())) for p in self.params]
        self._adam: tuple[tuple[int, int], list[int]] | None = None

    def _nan(self) -> torch.Tensor:
        return torch.full((len(self.params),), float("nan"), device=self.device)

    @torch.no_grad()
    def before_step(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weights' sums of squares (a copy kept for ΔW) and the gradients' figures, before clipping.

        Gradient figures: grad_sumsq, grad_max_abs, grad_nonfinite, NaN for a parameter without a gradient; with
        every gradient present also "clip_sumsq", the float32 sums of squares the clipper would compute (the
        same tensorstats call, so a clipper reusing them clips bit for bit as without the monitor)."""
        weight_sumsq = tensorstats.sums_of_squares(self.params)
        if self._snapshot is not None:
            torch._foreach_copy_(self._snapshot, [tensorstats.local(p.detach()) for p in self.params])
        present = [i for i, p in enumerate(self.params) if p.grad is not None]
        grads = [self.params[i].grad for i in present]
        if not grads:
            return weight_sumsq, {"grad_sumsq": self._nan(), "grad_max_abs": self._nan(), "grad_nonfinite": self._nan()}
        sq, mx = tensorstats.sumsq_and_max_abs(grads)
        bad = self._nonfinite(grads, sq)
        if len(present) == len(self.params):
            return weight_sumsq, {"grad_sumsq": sq, "grad_max_abs": mx, "grad_nonfinite": bad, "clip_sumsq": sq}
        index = torch.tensor(present).to(self.device, non_blocking=True)  # no wait for the device
        figures = {}
        for key, values in (("grad_sumsq", sq), ("grad_max_abs", mx), ("grad_nonfinite", bad)):
            figures[key] = self._nan().index_copy_(0, index, values)
        return weight_sumsq, figures

    @staticmethod
    def _nonfinite(grads: list[torch.Tensor], sumsq: torch.Tensor) -> torch.Tensor:
        """Non-finite counts per tensor. A NaN/Inf element makes its tensor's sum of squares non-finite, so on the
        CPU, where a host check costs no device sync, the elements are counted only when some sum is."""
        if sumsq.device.type == "cpu" and bool(torch.isfinite(sumsq).all()):
            return torch.zeros_like(sumsq)
        return tensorstats.nonfinite_counts(grads)

    @torch.no_grad()
    def after_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-tensor ||ΔW||^2, NaN when updates are off; per-tensor sum of Adam's exp_avg_sq, NaN without one)."""
        update = self._nan()
        if self._snapshot is not None:
            torch._foreach_sub_(self._snapshot, [tensorstats.local(p.detach()) for p in self.params])
            update = tensorstats.sums_of_squares(self._snapshot, shards_of=self.params)
        return update, self._adam_v_sums()

    def _adam_v_sums(self) -> torch.Tensor:
        state = self.optimizer.state if self.optimizer is not None else {}
        key = (id(self.optimizer), len(state))  # the tensors with a second moment, recounted when the state grows
        if self._adam is None or self._adam[0] != key:
            index = [i for i, p in enumerate(self.params) if "exp_avg_sq" in state.get(p, {})]
            self._adam = (key, index)
        index = self._adam[1]
        if not index:
            return self._nan()
        vs = [state[self.params[i]]["exp_avg_sq"] for i in index]
        sums = tensorstats.sums_of_nonnegative(vs).to(self.device)
        if len(index) == len(self.params):
            return sums
        return self._nan().index_copy_(0, torch.tensor(index).to(self.device, non_blocking=True), sums)

    @torch.no_grad()
    def histogram_samples(self, layers: list[str], values: int, of: str = "grad") -> dict[str, torch.Tensor]:
        """Per layer, an evenly strided sample of at most `values` gradient (of="grad") or weight (of="weight")
        values, on the device."""
        by_layer: dict[str, list[torch.Tensor]] = {}
        for layer, p in zip(layers, self.params, strict=True):
            tensor = p.grad if of == "grad" else p
            if tensor is not None:
                by_layer.setdefault(layer, []).append(tensorstats.local(tensor.detach()).reshape(-1))
        out = {}
        for layer, tensors in by_layer.items():
            stride = max(1, -(-sum(t.numel() for t in tensors) // values))
            out[layer] = torch.cat([t[::stride] for t in tensors])[:values].float()
        return out
