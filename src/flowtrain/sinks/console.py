"""The console progress bar: step, loss, lr, grad norm, tokens/s and ETA at a glance."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


class ConsoleSink:
    def __init__(self, total: int, initial: int = 0, enabled: bool = True):
        self._bar = tqdm(
            total=total,
            initial=initial,
            unit="step",
            dynamic_ncols=True,
            disable=not enabled,
            file=sys.stderr,
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}] {postfix}",
        )
        self._last = initial
        self.enabled = enabled

    def write(self, step: int, scalars: dict[str, Any]) -> None:
        self._bar.update(step - self._last)
        self._last = step
        post = {}
        for key, label, fmt in (
            ("loss", "loss", "{:.4f}"),
            ("lr", "lr", "{:.2e}"),
            ("grad_norm_preclip", "gnorm", "{:.3f}"),
            ("tokens_per_s", "tok/s", "{:,.0f}"),
        ):
            if isinstance(scalars.get(key), (int, float)):
                post[label] = fmt.format(scalars[key])
        self._bar.set_postfix(post, refresh=False)

    def message(self, text: str) -> None:
        """A line above the bar (evaluations, guard alerts); nothing when the console is off (log.console=false),
        since every such line is also in eval.jsonl / alerts.jsonl."""
        if self.enabled:
            self._bar.write(text, file=sys.stderr)

    def close(self) -> None:
        self._bar.close()
