"""Crash-safe file writes: a reader never sees a file or directory that looks finished but is not.

The pattern is always the same: write under a temporary name in the same directory, fsync the data, rename
over the final name (atomic on POSIX), fsync the directory so the rename itself survives a power cut. What
appears gets the permissions the user's umask gives new files and directories (tempfile makes its temporaries
private, 0600 / 0700, which would leave a shared run unreadable to colleagues).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path


def current_umask() -> int:
    """The process's umask, read without changing it where Linux reports it (/proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: the only portable way to read it, restored at once
    os.umask(mask)
    return mask


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_synced(path: Path, data: bytes) -> None:
    """Write `data` to `path` and fsync it (for files inside a directory that is renamed into place later)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success fsync its files and rename it to `final`.

    On any exception the temporary directory is removed, so nothing half-written remains. An existing `final`
    is replaced only after the new one is complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    mask = current_umask()
    try:
        os.chmod(tmp, 0o777 & ~mask)
        yield tmp
        for child in tmp.rglob("*"):  # whatever wrote them (safetensors writes its files 0600)
            if child.is_file():
                os.chmod(child, 0o666 & ~mask)
                fsync_file(child)
            elif child.is_dir():
                os.chmod(child, 0o777 & ~mask)
        fsync_dir(tmp)
        if final.exists():
            trash = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---- one writer at a time ------------------------------------------------------------------------------------
class Locked(Exception):
    """Another process holds the lock; `holder` says who (as its lock file tells: "PID 1234 on host")."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is locked by {holder}")
        self.path, self.holder = path, holder


class DirectoryLock:
    """An exclusive flock(2) on a lock file inside a directory, held until release() or the process ends: the
    OS drops it however the process dies (kill -9 included), so a lock is never left stale. The file keeps
    the holder's PID and host for the next one's message; it stays in place (removing it would race)."""

    def __init__(self, path: Path, fd: int, made_directory: bool = False):
        self.path, self._fd = path, fd
        self.made_directory = made_directory  # acquire() created the directory

    @classmethod
    def acquire(cls, directory: Path, name: str = ".lock", create: bool = False) -> DirectoryLock:
        """Lock `directory` (created first with `create`) or raise Locked naming the holder."""
        path = Path(directory) / name
        made = create and not path.parent.exists()
        if made:
            path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)  # the umask applies
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise Locked(path, holder or "a process that is starting (PID not written yet)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"PID {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        return cls(path, fd, made)

    @staticmethod
    def is_free(directory: Path, name: str = ".lock") -> bool:
        """Whether nobody holds the lock of `directory` now (False too when it has no lock file)."""
        try:
            fd = os.open(Path(directory) / name, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)  # also drops the lock just taken

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this machine (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
