"""Muon for the blocks' weight matrices, AdamW for everything else, as one torch optimizer (`optim.name=muon`).

Muon (Jordan et al. 2024; torch.optim.Muon) steps a matrix along its momentum orthogonalized by a Newton-Schulz
iteration, so every direction of the matrix moves at a similar rate. It is meant for the hidden matrices only:
embeddings, the output head, norm gains and biases keep AdamW (torch's documentation says the same). We take
Moonshot's learning-rate adjustment (`adjust_lr_fn="match_rms_adamw"`: lr x 0.2 x sqrt(max(rows, cols))), which
gives Muon's update the RMS of a typical AdamW update, so Muon reuses optim.lr and optim.weight_decay as they
are; momentum 0.95 with Nesterov, five Newton-Schulz steps (torch's defaults).

Both halves are torch's own optimizers. This class only presents them as one: one `param_groups` list (the
halves' group dicts themselves, so the LR schedule reaches both), one `state` (shared with both), and torch's
ordinary state_dict / load_state_dict, so checkpoints, rollbacks and the microscope see a single optimizer.
"""

from __future__ import annotations

from typing import Any

import torch

MUON_SETTINGS = {"momentum": 0.95, "nesterov": True, "ns_steps": 5, "adjust_lr_fn": "match_rms_adamw"}


class MuonWithAdamW(torch.optim.Optimizer):
    """torch.optim.Muon over `muon_groups` (2-D parameters only) and torch.optim.AdamW over `adamw_groups` (at
    `adamw_lr` when given, else at `lr`; optim.adamw_lr_scale sets it)."""

    def __init__(
        self,
        muon_groups: list[dict[str, Any]],
        adamw_groups: list[dict[str, Any]],
        *,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        adamw_impl: dict[str, bool],
        adamw_lr: float | None = None,
    ) -> None:
        muon_groups = [g for g in muon_groups if g["params"]]  # torch's optimizers refuse empty lists
        adamw_groups = [g for g in adamw_groups if g["params"]]
        self.halves: list[torch.optim.Optimizer] = []
        if muon_groups:
            self.halves.append(torch.optim.Muon(muon_groups, lr=lr, **MUON_SETTINGS))
        if adamw_groups:
            self.halves.append(torch.optim.AdamW(adamw_groups, lr=adamw_lr or lr, betas=betas, eps=eps, **adamw_impl))
        super().__init__([g for half in self.halves for g in half.param_groups], {})
        self._share()

    def _share(self) -> None:
        """Point both halves at this optimizer's groups and state (load_state_dict builds new ones)."""
        start = 0
        for half in self.halves:
            end = start + len(half.param_groups)
            half.param_groups, half.state = self.param_groups[start:end], self.state
            start = end

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for half in self.halves:
            half.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._share()
