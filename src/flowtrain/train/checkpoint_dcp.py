"""Sharded checkpoints (train.checkpoint_format=sharded): torch.distributed.checkpoint (DCP) directories,
written by every rank and loaded on any world size, with their pickled parts vetted before DCP reads them."""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from pathlib import Path

import torch
from torch.distributed.checkpoint.api import CheckpointException

from flowtrain.errors import CheckpointError
from flowtrain.fsutil import atomic_directory
from flowtrain.train import distributed as dist_util


def save_sharded(final: Path, model: torch.nn.Module, optimizer, write_small: Callable[[Path], None], is_main: bool):
    """Every rank writes its shards into rank 0's temporary directory; rank 0 adds the small files
    (`write_small(tmp)`, which hashes everything) and renames. dcp.save returns on rank 0 only after all
    ranks' shards are written (it gathers their write results before writing its .metadata)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    tensors = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    if not is_main:
        tmp = Path(dist_util.broadcast_json(None, _comm_device()))
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(tmp / "dcp")))
        return
    with atomic_directory(final) as tmp:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            dist_util.broadcast_json(str(tmp), _comm_device())
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(tmp / "dcp")))
        write_small(tmp)


def _comm_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def load_sharded(ckpt, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load a DCP checkpoint (any world size, any strategy, 1 process included) into the live objects."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    if optimizer is None:
        tensors = {"model": get_model_state_dict(model)}
    else:
        tensors = {"optim": get_optimizer_state_dict(model, optimizer)}
    index = ckpt.path / "dcp" / ".metadata"
    _vet_pickle(index.read_bytes() if index.is_file() else b"", str(index))  # before DCP touches it
    try:
        dcp.load(tensors, storage_reader=_SafeReader(str(ckpt.path / "dcp")), planner=_SafePlanner())
    except CheckpointError:
        raise
    except CheckpointException as exc:  # a BaseException: DCP wraps what failed on every rank in it
        raise _dcp_failure(ckpt.path, exc) from None
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {ckpt.path}: the sharded state does not fit this model/optimizer "
            f"({str(exc).strip().splitlines()[-1][:200]}); use the run's own config"
        ) from None
    if optimizer is None:
        set_model_state_dict(model, tensors["model"])
    else:
        set_optimizer_state_dict(model, optimizer, tensors["optim"])


def _dcp_failure(path: Path, exc: CheckpointException) -> CheckpointError:
    """One line for what went wrong inside dcp.load: our own refusal (a vetted value) as it was, else the
    first rank's error."""
    causes = [cause for cause, _trace in exc.failures.values()]
    ours = next((c for c in causes if isinstance(c, CheckpointError)), None)
    if ours is not None:
        return CheckpointError(f"checkpoint {path}: {ours}; refusing to load it")
    first = causes[0] if causes else exc
    detail = (str(first).strip().splitlines() or [type(first).__name__])[-1].split(". ")[0][:200]
    return CheckpointError(
        f"checkpoint {path}: the sharded state cannot be read ({type(first).__name__}: {detail}); it is corrupt "
        "or from another model: resume from an earlier checkpoint or use the run's own config"
    )


# DCP stores its index (.metadata) and non-tensor values with pickle. We never unpickle anything that could
# run code: the index must name only these classes, and values must pass torch's weights_only unpickler.
_DCP_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("collections", "OrderedDict"),
}


class _VettingUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) not in _DCP_METADATA_GLOBALS and not is_dtype:
            raise CheckpointError(f"DCP metadata refers to {module}.{name}, which a checkpoint index never needs")
        return super().find_class(module, name)


def _vet_pickle(data: bytes, what: str) -> None:
    try:
        _VettingUnpickler(io.BytesIO(data)).load()
    except CheckpointError as exc:
        raise CheckpointError(f"{what}: {exc}; refusing to load it") from None
    except Exception as exc:
        raise CheckpointError(f"{what} is corrupt ({exc}); resume from an earlier checkpoint") from None


def _dcp_classes():
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

    return DefaultLoadPlanner, FileSystemReader


class _SafeReader(_dcp_classes()[1]):
    """FileSystemReader whose .metadata is vetted by a restricted unpickler before torch reads it."""

    def read_metadata(self, *args, **kwargs):
        path = Path(self.path) / ".metadata"
        _vet_pickle(path.read_bytes(), f"{path}")
        return super().read_metadata(*args, **kwargs)


class _SafePlanner(_dcp_classes()[0]):
    """DefaultLoadPlanner that lets a non-tensor value through only if torch's weights_only unpickler takes it."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            torch.load(value, weights_only=True)
        except Exception as exc:
            raise CheckpointError(
                f"sharded checkpoint value {read_item.dest_index.fqn} is not plain data ({str(exc).splitlines()[0]})"
            ) from None
        value.seek(0)
        super().load_bytes(read_item, value)
