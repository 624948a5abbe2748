"""Device, precision and randomness: the parts of a run that depend on the machine.

RNG state is captured as plain uint8 tensors (torch's own format) so checkpoints can store it in safetensors
and restore it exactly; that is what makes `--resume` bitwise on CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import platform
import random
from dataclasses import dataclass

import numpy as np
import torch

from flowtrain.errors import ConfigError


def select_device(requested: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device that is not there is a config error."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    if requested == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("train.device=mps but MPS is not available; use train.device=auto or cpu")
    return torch.device(requested)


# glibc's malloc: blocks up to this size come from the heap, where freed memory is reused ...
MMAP_THRESHOLD = 256 << 20
# ... and free memory at the top of the heap goes back to the system only beyond this much
TRIM_THRESHOLD = 512 << 20
_allocator: str | None = None


def tune_cpu_allocator() -> str:
    """Keep freed tensor memory in the process instead of handing it back to the system at every step.

    Why: torch's CPU tensors come from glibc's malloc, which serves blocks above its mmap threshold (128 KiB,
    raised by itself up to 32 MiB) straight from the system and returns them on free; a training step frees and
    allocates the same activations again, so the next step touches fresh pages and the kernel zero-fills every
    one of them (docs/performance.md: ~15% of a shakespeare-char step on the CPU). A step's allocations
    repeat, so the heap settles at the peak the run needs anyway. Process-wide and
    idempotent, so only the `flowtrain` command applies it (on the CPU, `train.tune_allocator`), never a library
    constructor. Returns what was done, for env.json; with another C library nothing is changed, and the text
    says so."""
    global _allocator
    if _allocator is not None:
        return _allocator
    libc_name, _ = platform.libc_ver()
    if libc_name != "glibc":
        _allocator = f"default (not glibc: {libc_name or platform.system()})"
        return _allocator
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
        ok = libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD) == 1 and libc.mallopt(m_trim_threshold, TRIM_THRESHOLD) == 1
    except (OSError, AttributeError) as exc:
        _allocator = f"default (mallopt unavailable: {exc})"
        return _allocator
    _allocator = (
        f"glibc malloc: mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold {TRIM_THRESHOLD >> 20} MiB"
        if ok
        else "default (mallopt refused the thresholds)"
    )
    return _allocator


def allocator() -> str:
    """What tune_cpu_allocator() did in this process (env.json), or that it was not asked."""
    return _allocator or "default (not tuned)"


@dataclass(frozen=True)
class Precision:
    """How the forward pass runs: autocast dtype (or none) and whether fp16 loss scaling is needed."""

    dtype: torch.dtype | None
    device_type: str

    @property
    def needs_grad_scaler(self) -> bool:
        return self.dtype is torch.float16

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)


def select_precision(name: str, device: torch.device) -> Precision:
    if name == "float32":
        return Precision(None, device.type)
    if name == "float16" and device.type != "cuda":
        raise ConfigError("train.dtype=float16 needs a CUDA device (GradScaler); use bfloat16 or float32 here")
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if device.type == "cuda" and dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU does not support bfloat16; use train.dtype=float16 or float32")
    return Precision(dtype, device.type)


def seed_everything(seed: int) -> None:
    """Seed every generator a run might touch (torch CPU/CUDA, numpy, random)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict[str, torch.Tensor]:
    """The global torch RNG states as uint8 tensors (CPU, and each CUDA device when present)."""
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"torch_cuda_{i}"] = s
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch_cpu"].cpu())
    cuda = sorted((k for k in state if k.startswith("torch_cuda_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state[k].cpu() for k in cuda][: torch.cuda.device_count()])


# bf16 dense matmul peaks (FLOP/s) of common accelerators, for MFU when train.peak_tflops is unset.
_KNOWN_PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def peak_flops(device: torch.device, configured_tflops: float | None) -> float | None:
    """The MFU denominator: the configured peak, else a known accelerator's bf16 peak, else None (no MFU)."""
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in _KNOWN_PEAKS.items() if k in name), None)
    return None
