"""A request to end the training loop early (Trainer.request_stop: the CLI's SIGTERM / SIGINT handler sets
it), agreed by every rank of a data-parallel job so that all of them stop after the same step."""

from __future__ import annotations

import signal

from flowtrain.train.distributed import DataParallel


class StopRequest:
    """`reason`: why a stop was requested (a signal's name, e.g. "SIGTERM"), None while none was."""

    def __init__(self, parallel: DataParallel):
        self.parallel = parallel
        self.reason: str | None = None
        self._checks = 0

    def request(self, reason: str) -> None:
        """Only sets a field: safe in a signal handler. The first reason stays."""
        self.reason = self.reason or reason

    def agreed(self, every: int) -> bool:
        """Whether the loop stops before its next step: a stop was requested on any rank. The ranks agree with
        one all-reduce at every `every`-th call (every step on the CPU; on a GPU, the steps where the host waits
        anyway), and a rank that got no signal takes the name of the one another rank got."""
        self._checks += 1
        if self.parallel.world_size == 1:
            return self.reason is not None
        if (self._checks - 1) % every:
            return False
        mine = 0 if self.reason is None else int(getattr(signal.Signals, self.reason, 1))
        agreed = self.parallel.max_over_ranks(mine)
        if agreed and self.reason is None:
            self.reason = signal.Signals(agreed).name if agreed > 1 else "a stop requested on another rank"
        return agreed > 0
