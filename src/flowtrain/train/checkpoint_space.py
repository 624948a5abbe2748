"""A checkpoint that does not fit on the disk: how big one is, and the one-line error that says so."""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from flowtrain.errors import CheckpointError


def size_estimate(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """About how many bytes a checkpoint of `model` and `optimizer` takes: the tensors they save (a sharded
    model's in full, a tied weight once) plus 64 kB for the small files."""
    seen, total = set(), 64 << 10
    tensors = list(model.state_dict().values())
    if optimizer is not None:
        tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        try:
            key = (t.data_ptr(), t.numel())  # tied weights share their storage
        except RuntimeError:  # no storage to point at (a DTensor): count it
            key = id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _no_space(exc: BaseException | None) -> bool:
    """Whether a write failed for want of space (the OS's ENOSPC / EDQUOT, or torch.save's own words for a
    short write), anywhere in the exception's chain."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(words in str(exc) for words in ("No space left", "unexpected pos", "file write failed")):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextlib.contextmanager
def full_disk_reported(
    final: Path, model: torch.nn.Module, optimizer, earlier_exist: Callable[[], bool]
) -> Iterator[None]:
    """A checkpoint that did not fit on the disk is one line (after atomic_directory removed its partial
    temporary), saying how much it needs: the checkpoints before it are untouched."""
    try:
        yield
    except Exception as exc:
        need, free = size_estimate(model, optimizer), shutil.disk_usage(final.parent).free
        if not _no_space(exc) and free >= need:
            raise
        mb, run = 1 << 20, final.parent.parent
        then = (
            f"the earlier checkpoints are intact: free some space (or lower train.keep_last), then continue with "
            f"flowtrain train --resume {run}"
            if earlier_exist()
            else f"free some space, then flowtrain train --resume {run} starts it over"
        )
        raise CheckpointError(
            f"no space left on the device for checkpoint {final.name} in {final.parent}: it needs about "
            f"{need / mb:.1f} MB, {free / mb:.1f} MB are free; {then}"
        ) from None
