"""Filesystem faults for tests: a small tmpfs (a full disk on demand) and a filler that uses up its space.

    with small_tmpfs(tmp_path / "disk", "2m") as disk:   # skips the test, saying why, where mount is refused
        ...                                               # writers under `disk` meet ENOSPC past 2 MiB

CI runs the tests as root on a machine that permits the mount (tmpfs needs CAP_SYS_ADMIN)."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess

import pytest


@contextlib.contextmanager
def small_tmpfs(directory, size: str = "2m"):
    """Mount a tmpfs of ``size`` at ``directory`` (created) for the block; unmounted (lazily, should a file
    still be open) after it. pytest.skip with the reason when mounting is not permitted here."""
    directory = str(directory)
    os.makedirs(directory, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot make a small tmpfs")
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs the tests as root)")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0777", "tmpfs", directory],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {res.stderr.strip() or res.returncode}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", directory], capture_output=True)


def fill_up(directory, leave: int = 0) -> str:
    """Write a filler file in ``directory`` until its filesystem is full (then give back ``leave`` bytes)."""
    path = os.path.join(str(directory), "filler.bin")
    block = b"\0" * 65536
    with open(path, "wb", buffering=0) as f:    # unbuffered: nothing left over for close() to fail on
        try:
            while f.write(block):
                pass
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
    if leave:
        os.truncate(path, max(0, os.path.getsize(path) - leave))
    return path


def snapshot(directory) -> dict:
    """{relative path: bytes} of every file under ``directory`` (to prove an output was left intact)."""
    out = {}
    for root, _, files in os.walk(str(directory)):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, str(directory))] = f.read()
    return out
