"""Fused CPU reductions for the microscope (flowstats.cpp), compiled on first use.

Why a kernel of our own: on the CPU, torch's multi-tensor reductions loop over tensors one kernel at a time and
each statistic is one more pass over memory; the microscope needs several statistics of the same tensors every
step. flowstats.cpp takes a whole list of tensors per call and gets every statistic of a pass at once
(sum of squares and max |g| of the gradients; ||ΔW||, ||W|| and Adam's sum(v) in the one pass after the step).

How it is called: as a CPython extension module (flowbind.cpp wraps flowstats.cpp) wherever Python's headers
are installed, else through ctypes with the same calling convention (`_CtypesKernels`). The extension exists
for speed between torch's ops, where the caches are cold: there a ctypes call with its numpy pointer arrays
cost ~45-70 us, the extension's ~5-10 us (flowbind.cpp says how that was measured), and the microscope makes
a dozen such calls per monitored step.

The source is plain C++ with no torch headers: the system compiler builds it in a few seconds, with
-march=native (and -fopenmp when torch runs on libgomp.so.1, whose thread pool the kernels then share), into a
cache directory keyed by the sources, the flags, the Python ABI and this CPU's feature flags
($FLOWTRAIN_KERNEL_CACHE, default ~/.cache/flowtrain/kernels). Nothing here is required: without a compiler,
or with FLOWTRAIN_KERNELS=0, `library()` is None and every caller takes its torch path (same numbers to
~1e-7); a run's env.json says which (`cpu_kernels`). Only CPU float32 contiguous tensors take this path
(`takes`); GPUs keep torch's fused kernels.

`hooks()` builds a second module the same way, flowhooks.cpp (the microscope's hooks along depth in C++), which
includes torch's C++ headers and links to its libraries, so it is compiled against the torch installed here.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

SOURCE = Path(__file__).with_name("flowstats.cpp")
BINDING = Path(__file__).with_name("flowbind.cpp")  # the CPython module around SOURCE
# the first that compiles wins; no contraction of a*b+c into fma unless written (the Adam step must round
# exactly where torch's does), no errno from sqrt (so it vectorizes)
FLAG_SETS = (["-O3", "-march=native"], ["-O3"])
COMMON_FLAGS = ["-ffp-contract=off", "-fno-math-errno"]
FUNCTIONS = ("sumsq_maxabs", "nonfinite", "sums", "weights", "update", "attention", "adam_step", "flow_tables")
_VOID_P = ctypes.c_void_p
_I64 = ctypes.c_int64

_lib: Any = None  # the extension module or a _CtypesKernels: FUNCTIONS plus one(), two() and logits()
_tried = False
build_error: str | None = None  # why the library is not there (env.json's cpu_kernels, tests)
binding: str | None = None  # "extension" or "ctypes" once built


def _cpu_fingerprint() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _torch_libgomp() -> bool:
    """Whether torch runs on GNU OpenMP loaded under the name our -fopenmp build links to (libgomp.so.1): then
    the dynamic loader hands the kernels torch's copy and its thread pool. A wheel that ships libgomp under
    another name (libgomp-<hash>.so.1) would get a second runtime fighting torch's for the cores: no OpenMP."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    loaded = {line.rsplit("/", 1)[-1] for line in maps.splitlines() if "libgomp" in line}
    return "OpenMP" in torch.__config__.parallel_info() and loaded == {"libgomp.so.1"}


def _flag_sets() -> list[list[str]]:
    sets = [list(f) for f in FLAG_SETS]
    if _torch_libgomp():
        sets.insert(0, [*FLAG_SETS[0], "-fopenmp"])
    return sets


def _cache_dirs() -> list[Path]:
    """Where built kernels are kept: $FLOWTRAIN_KERNEL_CACHE, else ~/.cache/flowtrain/kernels, then (a
    read-only home) a per-user directory under the system's temporary directory."""
    root = os.environ.get("FLOWTRAIN_KERNEL_CACHE")
    if root:
        return [Path(root)]
    user = os.getuid() if hasattr(os, "getuid") else "user"
    return [Path.home() / ".cache" / "flowtrain" / "kernels", Path(tempfile.gettempdir()) / f"flowtrain-kernels-{user}"]


def _python_include() -> str | None:
    """Python's C headers, when this interpreter has them installed (else the ctypes binding)."""
    include = sysconfig.get_paths().get("include")
    return include if include and Path(include, "Python.h").exists() else None


def _compile(cxx: str, flags: list[str], source: Path, target: Path, link: Sequence[str] = ()) -> None:
    """Build into a temporary file next to `target`, then rename: concurrent ranks never load half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        std = [] if any(f.startswith("-std=") for f in flags) else ["-std=c++17"]
        cmd = [cxx, *flags, *COMMON_FLAGS, "-shared", "-fPIC", *std, "-o", tmp, str(source), *link]
        subprocess.run(cmd, check=True, capture_output=True, timeout=300)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.ft_sumsq_maxabs.argtypes = [_I64, _VOID_P, _VOID_P, _VOID_P, _VOID_P]
    lib.ft_nonfinite.argtypes = [_I64, _VOID_P, _VOID_P, _VOID_P]
    lib.ft_sums.argtypes = [_I64, _VOID_P, _VOID_P, _VOID_P]
    lib.ft_weights.argtypes = [_I64, _VOID_P, _VOID_P, _VOID_P, _VOID_P]
    lib.ft_update.argtypes = [_I64, _VOID_P, _VOID_P, _VOID_P, _VOID_P, _VOID_P, ctypes.c_int]
    lib.ft_sumsq_maxabs1.argtypes = [_VOID_P, _I64, _VOID_P]
    lib.ft_sumsq_maxabs2.argtypes = [_VOID_P, _I64, _VOID_P, _I64, _VOID_P]
    lib.ft_logits.argtypes = [_VOID_P, _I64, _I64, _VOID_P]
    lib.ft_attention.argtypes = [_I64, _VOID_P, _VOID_P, _VOID_P, _VOID_P, *[_I64] * 5, _VOID_P, _I64, ctypes.c_int]
    lib.ft_attention.argtypes += [ctypes.c_double, _VOID_P]
    lib.ft_adam_step.argtypes = [_I64, *[_VOID_P] * 8, ctypes.c_double, ctypes.c_double, ctypes.c_double]
    lib.ft_adam_step.argtypes += [ctypes.c_int, _I64, _VOID_P]
    lib.ft_flow_tables.argtypes = [_I64, *[_VOID_P] * 7, _I64, *[_VOID_P] * 5]
    for name in (*FUNCTIONS, "sumsq_maxabs1", "sumsq_maxabs2", "logits"):
        getattr(lib, "ft_" + name).restype = None
    return lib


class _CtypesKernels:
    """flowstats.cpp loaded with ctypes, called the way the extension module is (see flowbind.cpp): pointer
    arguments may be None, an int, a list of ints (an array of addresses) or a numpy array."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = _declare(lib)
        self._out = np.empty(4, np.float64)  # one(), two() and logits() write here (the hooks run on one thread)
        self._out_addr = self._out.ctypes.data
        for name in FUNCTIONS:
            setattr(self, name, self._caller(getattr(self._lib, "ft_" + name)))

    @staticmethod
    def _caller(function):
        def call(*args):
            keep = []  # pointer arrays built here live until the call returns
            converted = []
            for a in args:
                if isinstance(a, (list, tuple)):
                    keep.append(np.array([0 if x is None else x for x in a], dtype=np.uint64))
                    a = keep[-1]
                converted.append(a.ctypes.data if isinstance(a, np.ndarray) else a)
            function(*converted)

        return call

    def grad_sumsq_maxabs(self, params: list, types: tuple, f32: torch.dtype, sq, mx, sq32) -> bool | None:
        grads = [p.grad for p in params]
        if not all(type(g) in types and g.dtype is f32 and g.is_cpu and g.is_contiguous() for g in grads):
            return None
        m = np.empty(len(grads), np.float32)
        self.sumsq_maxabs(len(grads), _ptrs(grads), _numels(grads), sq, m)
        mx[:] = np.where(np.isnan(sq), sq, m)
        sq32[:] = sq
        return bool(np.isfinite(sq).all())

    def attention_of(self, calls: list, types: tuple, f32: torch.dtype, nb: int, nh: int, rows) -> list | bool:
        causal = {bool(c[5]) if len(c) > 5 else True for c in calls}
        if any(len(c) > 3 and c[3] is not None for c in calls) or len(causal) != 1:
            return False
        qs, ks = [c[0] for c in calls], [c[1] for c in calls]
        if len({(q.shape, k.shape) for q, k in zip(qs, ks, strict=True)}) != 1:
            return False
        pairs = list(zip(qs, ks, strict=True))
        if not all(type(t) in types and t.dtype is f32 and attention_takes(q, k) for q, k in pairs for t in (q, k)):
            return False
        return attention(qs, ks, nb, nh, rows, causal.pop()).tolist()

    def one(self, pointer: int, count: int) -> tuple[float, float]:
        self._lib.ft_sumsq_maxabs1(pointer, count, self._out_addr)
        sq, mx = self._out[:2].tolist()
        return sq, (mx if sq == sq else sq)

    def two(self, pointer_a: int, count_a: int, pointer_b: int, count_b: int) -> tuple[float, float, float, float]:
        self._lib.ft_sumsq_maxabs2(pointer_a, count_a, pointer_b, count_b, self._out_addr)
        sq_a, mx_a, sq_b, mx_b = self._out.tolist()
        return sq_a, (mx_a if sq_a == sq_a else sq_a), sq_b, (mx_b if sq_b == sq_b else sq_b)

    def logits(self, pointer: int, rows: int, vocab: int) -> tuple[float, float]:
        self._lib.ft_logits(pointer, rows, vocab, self._out_addr)
        mx, lse = self._out[:2].tolist()
        return mx, lse


def _load_extension(path: Path, name: str = "_flowstats"):
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _variants() -> list[tuple[str, Path, list[str], str]]:
    """(binding, source, extra flags, file suffix) to try, best first."""
    include = _python_include()
    ctypes_build = ("ctypes", SOURCE, [], ".so")
    if include is None:
        return [ctypes_build]
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    return [("extension", BINDING, [f"-I{include}"], suffix), ctypes_build]


def _build_and_load(cxx: str, kind: str, source: Path, flags: list[str], suffix: str, errors: list[str]) -> Any:
    """One binding with one set of flags from the first cache directory that works; None (and why, in
    `errors`) when it cannot be had. Raises _Refused when the compiler rejects the flags."""
    sources = [SOURCE.read_bytes(), BINDING.read_bytes() if kind == "extension" else b""]
    parts = [*sources, " ".join([*flags, *COMMON_FLAGS]).encode(), _cpu_fingerprint().encode(), suffix.encode()]
    key = hashlib.sha256(b"\0".join([*parts, cxx.encode()])).hexdigest()[:16]
    for cache in _cache_dirs():
        target = cache / f"flowstats-{kind}-{platform.machine()}-{key}{suffix}"
        try:
            if not target.exists():
                _compile(cxx, flags, source, target)
            return _load_extension(target) if kind == "extension" else _CtypesKernels(ctypes.CDLL(str(target)))
        except (OSError, ImportError, subprocess.SubprocessError) as exc:
            stderr = (getattr(exc, "stderr", b"") or b"").decode(errors="replace")[-300:]
            errors.append(f"{kind} {' '.join(flags)} in {cache}: {exc} {stderr}".strip())
            if isinstance(exc, subprocess.SubprocessError):
                raise _Refused from exc  # another directory will not help
    return None


class _Refused(Exception):
    """The compiler rejected a set of flags."""


def _compiler() -> str | None:
    """$CXX, else the first C++ compiler on PATH."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++") or shutil.which("c++")


def library() -> Any:
    """The compiled kernels, building them the first time; None when they cannot be had (callers fall back)."""
    global _lib, _tried, build_error, binding
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("FLOWTRAIN_KERNELS", "1") == "0":
        build_error = "disabled by FLOWTRAIN_KERNELS=0"
        return None
    cxx = _compiler()
    if cxx is None:
        build_error = "no C++ compiler (g++/clang++) on PATH"
        return None
    errors: list[str] = []
    for kind, source, extra, suffix in _variants():
        for flags in _flag_sets():
            try:
                _lib = _build_and_load(cxx, kind, source, [*flags, *extra], suffix, errors)
            except _Refused:
                continue  # the next, plainer flags
            if _lib is not None:
                build_error, binding = None, kind
                return _lib
            break  # built but neither stored nor loaded anywhere: other flags will not change that
    build_error = "; ".join(errors)
    return None


def reset() -> None:
    """Forget the loaded libraries (tests switch FLOWTRAIN_KERNELS and FLOWTRAIN_NATIVE_HOOKS on and off)."""
    global _lib, _tried, build_error, binding, _hooks, _hooks_tried, hooks_error
    _lib, _tried, build_error, binding = None, False, None, None
    _hooks, _hooks_tried, hooks_error = None, False, None


# -- the hooks along depth in C++ (flowhooks.cpp) ------------------------------------------------------------

HOOKS_SOURCE = Path(__file__).with_name("flowhooks.cpp")
_hooks: Any = None
_hooks_tried = False
hooks_error: str | None = None  # why the C++ hooks are not there (env.json's cpu_hooks, tests)


def _torch_build_flags() -> tuple[list[str], list[str]]:
    """Compiler flags and link arguments for code that includes torch's headers and links to its libraries:
    the ones torch was built with, taken from torch itself (no build tool needed)."""
    from torch.utils import cpp_extension

    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    flags = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    link: list[str] = []
    for lib_dir in cpp_extension.library_paths():
        link += [f"-L{lib_dir}", f"-Wl,-rpath,{lib_dir}"]
    return flags, [*link, "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python"]


def hooks() -> Any:
    """The C++ hooks (module _flowhooks), building them the first time (~15 s on 2 cores, once per machine and
    torch version); None when they cannot be had: then hooks.py's Python hooks do the same work.

    They need what the kernels need plus Python's headers and torch's C++ headers (in every torch wheel);
    FLOWTRAIN_NATIVE_HOOKS=0 (or FLOWTRAIN_KERNELS=0) turns them off."""
    global _hooks, _hooks_tried, hooks_error
    if _hooks_tried:
        return _hooks
    _hooks_tried = True
    if os.environ.get("FLOWTRAIN_NATIVE_HOOKS", "1") == "0":
        hooks_error = "disabled by FLOWTRAIN_NATIVE_HOOKS=0"
        return None
    if library() is None or binding != "extension":
        hooks_error = f"no CPU kernels extension ({build_error or binding})"
        return None
    cxx = _compiler()  # there: the kernels were built with it
    try:
        torch_flags, link = _torch_build_flags()
    except Exception as exc:  # a torch without its C++ headers
        hooks_error = f"torch's C++ build flags: {exc}"
        return None
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    sources = [SOURCE.read_bytes(), HOOKS_SOURCE.read_bytes()]
    errors: list[str] = []
    for flags in _flag_sets():
        for std in ("-std=c++20", "-std=c++17"):
            all_flags = [*flags, std, f"-I{_python_include()}", *torch_flags]
            parts = [*sources, " ".join([*all_flags, *COMMON_FLAGS, *link]).encode(), _cpu_fingerprint().encode()]
            parts += [suffix.encode(), cxx.encode(), torch.__version__.encode()]
            key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
            for cache in _cache_dirs():
                target = cache / f"flowhooks-{platform.machine()}-{key}{suffix}"
                try:
                    if not target.exists():
                        _compile(cxx, all_flags, HOOKS_SOURCE, target, link)
                    _hooks, hooks_error = _load_extension(target, "_flowhooks"), None
                    return _hooks
                except (OSError, ImportError, subprocess.SubprocessError) as exc:
                    stderr = (getattr(exc, "stderr", b"") or b"").decode(errors="replace")[-300:]
                    errors.append(f"{' '.join(flags)} {std} in {cache}: {exc} {stderr}".strip())
                    if isinstance(exc, subprocess.SubprocessError):
                        break  # the compiler refused these flags: another directory will not help
    hooks_error = "; ".join(errors)
    return None


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def cpu_f32(t: torch.Tensor) -> bool:
    """A plain (not DTensor or other subclass) CPU float32 tensor; cheapest checks first (hooks ask this)."""
    return t.dtype is torch.float32 and t.is_cpu and type(t) in _PLAIN


def _built() -> bool:
    return (_lib if _tried else library()) is not None


def takes(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether these tensors can take the kernels: plain CPU float32 contiguous tensors, and the kernels built."""
    return _built() and all(cpu_f32(t) and t.is_contiguous() for t in tensors)


def takes_one(t: torch.Tensor) -> bool:
    """takes([t]) for one tensor, without the list (the hooks ask it for every boundary of a monitored step)."""
    return cpu_f32(t) and t.is_contiguous() and _built()


def _ptrs(tensors: Sequence[torch.Tensor | None]) -> list[int]:
    """Addresses of the tensors' data (0 for None): the kernels' arrays of pointers."""
    return [0 if t is None else t.data_ptr() for t in tensors]


def _numels(tensors: Sequence[torch.Tensor]) -> np.ndarray:
    return np.array([t.numel() for t in tensors], dtype=np.int64)


def sumsq_maxabs(tensors: Sequence[torch.Tensor], numels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per tensor: sum of squares (float64) and max |x| (float32; NaN where the tensor holds a NaN), one pass."""
    n = len(tensors)
    sq, mx = np.empty(n, np.float64), np.empty(n, np.float32)
    library().sumsq_maxabs(n, _ptrs(tensors), _numels(tensors) if numels is None else numels, sq, mx)
    nan = np.isnan(sq)  # only a NaN element makes a sum of non-negative squares NaN
    if nan.any():
        mx[nan] = np.nan
    return sq, mx


def grad_sumsq_maxabs(params: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray, torch.Tensor, bool] | None:
    """Every parameter's gradient found, checked and reduced in one call: (sums of squares and max |g| as float64,
    NaN where the sum is; the sums as a float32 tensor, for the clipper; whether all sums are finite), or None
    when some parameter has no gradient or one that is not a plain contiguous CPU float32 tensor. In the training
    loop the same checks and small numpy and torch steps cost ~0.2 ms a step as Python. The kernels must be
    loaded (`takes`)."""
    n = len(params)
    sq, mx, sq32 = np.empty(n), np.empty(n), np.empty(n, np.float32)
    if _hooks is not None:  # loaded for a CPU float32 model: reads the gradients from C++ (flowhooks.cpp)
        finite = _hooks.grad_sumsq_maxabs(params, _PLAIN, sq, mx, sq32)
    else:
        finite = _lib.grad_sumsq_maxabs(params, _PLAIN, torch.float32, sq, mx, sq32)
    return None if finite is None else (sq, mx, torch.from_numpy(sq32), finite)


def nonfinite(tensors: Sequence[torch.Tensor]) -> np.ndarray:
    """Per tensor: count of NaN/Inf elements (int64)."""
    out = np.empty(len(tensors), np.int64)
    library().nonfinite(len(tensors), _ptrs(tensors), _numels(tensors), out)
    return out


def sums(tensors: Sequence[torch.Tensor], numels: np.ndarray | None = None) -> np.ndarray:
    """Per tensor: sum of elements (float64)."""
    out = np.empty(len(tensors), np.float64)
    library().sums(len(tensors), _ptrs(tensors), _numels(tensors) if numels is None else numels, out)
    return out


def weights(params: Sequence[torch.Tensor], snapshot: Sequence[torch.Tensor] | None, numels: np.ndarray) -> np.ndarray:
    """Per tensor ||w||^2 (float64); with `snapshot` (same shapes), copy the weights into it in the same pass."""
    out = np.empty(len(params), np.float64)
    library().weights(len(params), _ptrs(params), _ptrs(snapshot) if snapshot is not None else None, numels, out)
    return out


def update(
    params: Sequence[torch.Tensor],
    snapshot: Sequence[torch.Tensor],
    second_moments: Sequence[torch.Tensor | None] | None,
    numels: np.ndarray,
    copy: bool,
) -> np.ndarray:
    """[n, 3] float64: ||w - snapshot||^2, ||w||^2, sum(v) (0 where no v) per tensor; `copy`: snapshot = w."""
    n = len(params)
    out = np.empty((n, 3), np.float64)
    v = _ptrs(second_moments) if second_moments is not None else None
    library().update(n, _ptrs(params), _ptrs(snapshot), v, numels, out, int(copy))
    return out


def one(t: torch.Tensor) -> tuple[float, float]:
    """(sum of squares, max |x|) of one tensor that `takes([t])` accepts; max is NaN when the sum is."""
    return _lib.one(t.data_ptr(), t.numel())


def two(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float, float]:
    """one(a) + one(b) in one call (the same numbers): a gradient and its activation, read in the gradient's hook."""
    return _lib.two(a.data_ptr(), a.numel(), b.data_ptr(), b.numel())


def logits(z: torch.Tensor) -> tuple[float, float, int]:
    """(max |z|, sum over rows of logsumexp, rows) of contiguous float32 logits [..., vocab]."""
    v = z.shape[-1]
    rows = z.numel() // v if v else 0
    mx, lse = _lib.logits(z.data_ptr(), rows, v)
    return (mx if lse == lse else float("nan")), lse, rows


def attention_takes(q: torch.Tensor, k: torch.Tensor) -> bool:
    """q [B, H, T, D] and k [B, H, S, D] of the plain kind the attention kernel reads (strided is fine)."""
    return (
        q.dim() == 4
        and k.dim() == 4
        and q.shape[:2] == k.shape[:2]
        and q.shape[3] == k.shape[3]
        and q.stride(3) == 1
        and k.stride(3) == 1
        and cpu_f32(q)
        and cpu_f32(k)
        and _built()
    )


def attention(
    qs: Sequence[torch.Tensor], ks: Sequence[torch.Tensor], nb: int, nh: int, rows: np.ndarray, causal: bool
) -> np.ndarray:
    """[n, 2] float64: (mean entropy, max logit) of the sampled rows of softmax(q k^T / sqrt(d)) per (q, k) pair.

    All pairs share one shape; `rows` (int64) are the sampled query positions; the first nb sequences and nh
    heads are sampled; causal: query i sees keys up to i + S - T.
    """
    b, h, t, d = qs[0].shape
    s = ks[0].shape[2]
    nb, nh = min(nb, b), min(nh, h)
    q_strides = [x for q in qs for x in q.stride()[:3]]  # int64 each, as the pointer-sized entries of a list
    k_strides = [x for k in ks for x in k.stride()[:3]]
    out = np.empty((len(qs), 2), np.float64)
    library().attention(
        len(qs), _ptrs(qs), _ptrs(ks), q_strides, k_strides, nb, nh, t, s, d, rows, len(rows), int(causal), d**-0.5, out
    )
    return out


def attention_of(calls: list[tuple], nb: int, nh: int, rows: np.ndarray) -> list[list[float]] | None:
    """attention() of the calls an attention kernel got, one argument tuple (q, k, v, mask, dropout_p, is_causal)
    per block, all checked and read in one call: [entropy, max logit] per call as floats, or None when they do not
    all qualify (a mask, a tensor attention_takes refuses, shapes or is_causal that differ) and the caller looks
    at each one."""
    pairs = _lib.attention_of(calls, _PLAIN, torch.float32, nb, nh, rows)
    return None if pairs is False else pairs


def adam_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    hyper: np.ndarray,
    betas: tuple[float, float],
    eps: float,
    decoupled: bool,
    vec: int,
) -> np.ndarray:
    """One Adam (decoupled=False) or AdamW step in place, with torch's fused CPU arithmetic (flowstats.cpp);
    hyper is [3, n] float64: learning rate, weight decay and step count (after the increment) per tensor; vec is
    torch's SIMD width in floats. Returns [n, 4] float64: ||W before||^2, ||dW||^2, ||W after||^2, sum(v)."""
    n = len(params)
    out = np.empty((n, 4), np.float64)
    pointers = [_ptrs(params), _ptrs(grads), _ptrs(exp_avgs), _ptrs(exp_avg_sqs)]
    hyper = np.ascontiguousarray(hyper, dtype=np.float64)
    library().adam_step(
        n, *pointers, _numels(params), hyper[0], hyper[1], hyper[2], betas[0], betas[1], eps, int(decoupled), vec, out
    )
    return out


def flow_tables(
    grads: dict, wsq: np.ndarray, usq: np.ndarray | None, v_rms: np.ndarray, numels: np.ndarray,
    order: np.ndarray, starts: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, list[float]]:  # fmt: skip
    """The per-tensor [n, 8] and per-layer [L, 8] float32 tables of one step (TENSOR_STATS columns) from the
    per-tensor sums, and the totals [||W||, ||dW|| (NaN without usq), non-finite gradient values] as floats
    (float32 values); `grads` has grad_sumsq, grad_max_abs, grad_nonfinite; layers as in records.LayerGroups."""
    n, n_layers = len(wsq), len(starts)
    f64 = [np.ascontiguousarray(a, dtype=np.float64) for a in (*(grads[k] for k in GRAD_KEYS), wsq, v_rms)]
    usq64 = np.ascontiguousarray(usq, dtype=np.float64) if usq is not None else None
    tensors, layers = np.empty((n, 8), np.float32), np.empty((n_layers, 8), np.float32)
    totals = np.empty(3, np.float32)
    gsq, gmax, bad, w, v = f64
    library().flow_tables(n, gsq, gmax, bad, w, usq64, v, numels, n_layers, order, starts, tensors, layers, totals)
    return tensors, layers, totals.tolist()


GRAD_KEYS = ("grad_sumsq", "grad_max_abs", "grad_nonfinite")
