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
