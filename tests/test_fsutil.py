"""Crash-safe writes leave files and directories with the permissions the user's umask gives, not tempfile's
private 0600 / 0700."""

import os
import stat

import pytest

from flowtrain.fsutil import atomic_directory, atomic_write_text, current_umask


@pytest.fixture
def umask():
    def set_umask(mask):
        os.umask(mask)

    old = os.umask(0o022)
    yield set_umask
    os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_files_and_directories_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    assert current_umask() == mask
    atomic_write_text(tmp_path / "report.html", "<html></html>")
    assert mode(tmp_path / "report.html") == 0o666 & ~mask
    with atomic_directory(tmp_path / "checkpoints" / "step_000010") as tmp:
        (tmp / "model.safetensors").write_bytes(b"weights")
        os.chmod(tmp / "model.safetensors", 0o600)  # as safetensors leaves its files
        (tmp / "dcp").mkdir(mode=0o700)
    assert mode(tmp_path / "checkpoints" / "step_000010") == 0o777 & ~mask
    assert mode(tmp_path / "checkpoints" / "step_000010" / "model.safetensors") == 0o666 & ~mask
    assert mode(tmp_path / "checkpoints" / "step_000010" / "dcp") == 0o777 & ~mask
    assert (tmp_path / "report.html").read_text() == "<html></html>"


def test_a_failed_directory_leaves_nothing(tmp_path, umask):
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "step_000001") as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


_HOLD = """
import sys, time
from flowtrain.fsutil import DirectoryLock
DirectoryLock.acquire(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


def test_a_directory_lock_names_its_holder_and_dies_with_it(tmp_path):
    """Another process's lock is refused with its PID; kill -9 it and the OS has let go (never a stale lock)."""
    import signal
    import socket
    import subprocess
    import sys

    from flowtrain.fsutil import DirectoryLock, Locked
    from tests.train.killing import env

    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env()
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(Locked) as refused:
            DirectoryLock.acquire(tmp_path)
        assert refused.value.holder == f"PID {holder.pid} on {socket.gethostname()}"
        assert not DirectoryLock.is_free(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert DirectoryLock.is_free(tmp_path)
    mine = DirectoryLock.acquire(tmp_path)
    assert (tmp_path / ".lock").read_text().startswith(f"PID {os.getpid()} ")
    mine.release()
