"""Test tiers: `make test-fast` runs ``pytest -m "not slow"`` before a commit; `make test` (CI) runs everything.

The `slow` tier holds every test that starts ranks — the gloo harness (tests/distributed.py), torchrun, the
DeepSpeed launcher, mpirun, Slurm — and, by measurement, those that train through the CLI in a subprocess, the
demo and the benchmark-like ones (README, Tests). The first kind is enforced here: installed by tests/conftest.py,
the guard refuses such a launch in a test without the marker (the launch does not happen), and the test fails
with one line naming itself and the launcher — also when it caught the exception. The launch is attributed to
the test being set up, run or torn down, so a module fixture that starts ranks counts for the first test using it.
What it sees: every ``subprocess.Popen`` (``subprocess.run`` included) of this process, and ``run_distributed``.
A launcher started by a script the test runs (a shell template calling srun) is not seen: those files are
marked as a whole.
"""
from __future__ import annotations

import contextlib
import os
import subprocess

import pytest

LAUNCHER_PROGRAMS = {"torchrun", "deepspeed", "mpirun", "mpiexec", "srun", "sbatch", "salloc"}
LAUNCHER_MODULES = {"torch.distributed.run", "torch.distributed.launch", "deepspeed.launcher.runner",
                    "deepspeed.launcher.launch", "witscale.launch"}


class LaunchOutsideSlowTier(RuntimeError):
    """A test without the `slow` marker started ranks."""


_REFUSED = pytest.StashKey[list]()
_state = {"item": None, "popen_init": None}


def launcher_in(args) -> str | None:
    """The launcher a subprocess command line starts (a program or a ``-m`` module), else None."""
    if isinstance(args, (str, bytes)):      # a shell line: its words, roughly
        text = os.fsdecode(args)
        for sep in ";&|()`$'\"":
            text = text.replace(sep, " ")
        args = text.split()
    elif isinstance(args, os.PathLike):
        args = [args]
    for token in (os.fsdecode(a) if isinstance(a, (str, bytes, os.PathLike)) else str(a) for a in args):
        if os.path.basename(token) in LAUNCHER_PROGRAMS or token in LAUNCHER_MODULES:
            return token
    return None


def refuse_unless_slow(what: str) -> None:
    """Raise ``LaunchOutsideSlowTier`` when the test running now is not marked slow (outside a test: allowed)."""
    item = _state["item"]
    if item is None or item.get_closest_marker("slow") is not None:
        return
    item.stash.setdefault(_REFUSED, []).append(what)
    raise LaunchOutsideSlowTier(refusal_line(item.nodeid, what))


def refusal_line(nodeid: str, what: str) -> str:
    return (f"{nodeid} launches {what} but is not marked slow: add @pytest.mark.slow (or a module-level "
            f"pytestmark = pytest.mark.slow); see README, Tests")


def forget_refusals(item) -> list:
    """The refusals recorded for ``item``, cleared (for the guard's own tests)."""
    refused = item.stash.get(_REFUSED, [])
    item.stash[_REFUSED] = []
    return refused


def install() -> None:
    from tests import distributed

    popen_init = _state["popen_init"] = subprocess.Popen.__init__

    def guarded_popen_init(self, args, *a, **kw):
        launcher = launcher_in(args)
        if launcher is not None:
            refuse_unless_slow(f"`{launcher}`")
        popen_init(self, args, *a, **kw)

    subprocess.Popen.__init__ = guarded_popen_init
    distributed.launch_guard = lambda world_size: refuse_unless_slow(f"{world_size} gloo ranks")


def uninstall() -> None:
    from tests import distributed

    if _state["popen_init"] is not None:
        subprocess.Popen.__init__ = _state["popen_init"]
        _state["popen_init"] = None
    distributed.launch_guard = None


@contextlib.contextmanager
def running(item):
    _state["item"] = item
    try:
        yield
    finally:
        _state["item"] = None


def fail_report_of_a_refused_launch(item, call, report) -> None:
    """One line for a refused launch; a test that swallowed the refusal fails all the same."""
    refused = item.stash.get(_REFUSED, None)
    if refused and (report.failed or call.when == "call"):
        report.outcome = "failed"
        report.longrepr = refusal_line(item.nodeid, refused[0])
