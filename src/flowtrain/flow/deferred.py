"""Device numbers whose last arithmetic happens on the host.

On an accelerator a monitored step ends with a few dozen scalars per statistic family scattered over device
tensors. Finishing them there (square roots, divisions by counts, NaN where nothing was seen) costs a dozen
small kernel launches per family and, where the inputs live on the host (counts, which boundaries were seen),
a host->device copy that waits for the device queue. Instead the step stacks the raw device values into one
tensor (one launch) and keeps the host-side facts in a closure; `FlowMonitor.collect` moves every step's raw
values in its single transfer and calls `finish` on the numpy array.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Deferred:
    tensor: torch.Tensor  # what travels to the host (flattened on the way)
    finish: Callable[[np.ndarray], np.ndarray]  # the numpy array of `tensor` (its shape) -> the final values


def gather(values: list, device: torch.device) -> tuple[torch.Tensor | None, Callable[[np.ndarray], list[float]]]:
    """One stacked float32 device tensor of the 0-dim tensors in `values` (None if there are none), and
    `fill(raw)`: `values` as floats once the stack's numbers `raw` are on the host (NaN for None, Python
    floats as they were)."""
    host = np.full(len(values), np.nan)
    positions, tensors = [], []
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor):
            positions.append(i)
            tensors.append(v.reshape(()).float())
        elif v is not None:
            host[i] = float(v)

    def fill(raw: np.ndarray) -> list[float]:
        out = host.copy()
        out[positions] = raw
        return out.tolist()

    return (torch.stack(tensors).to(device) if tensors else None), fill
