"""Fault injection for the resilience tests (test-only; inert unless WITSCALE_FAULT is set).

    WITSCALE_FAULT=<kind>:<step>[:<rank>]      (rank defaults to 0; '*' is every rank)

Kinds: ``crash_in_save``, ``kill_in_save`` and ``kill_after_save`` (witscale/training/checkpoint.py: die with
shards written but no commit, SIGKILL right after DeepSpeed's files are written, or right after a complete
checkpoint), ``raise_in_step`` (witscale/train.py: an exception on one
rank before the step, while the others enter its collectives — the fail-fast path), ``stop_in_step`` (SIGSTOP to
itself before the step: a hung rank, found by the others' step watchdog, --step-timeout), ``sleep_in_step`` (an hour's
sleep before the step's batch, first Slurm attempt only: a rank alive but stuck outside any collective), ``nan_loss`` and ``inf_loss``
(witscale/training/trainer.py: the non-zero token weights of the step's first micro-batch on that rank become
NaN / +inf, as one bad value in a dataset's weights channel would make the loss and the gradients — the
non-finite guard, independent of the data path and its validation).

    WITSCALE_SLOW_SAVE=<seconds>               every checkpoint takes that much longer (a 70B save in a test)
    WITSCALE_SLOW_CONVERSION=<seconds>         the universal-checkpoint conversion takes that much longer
    WITSCALE_KILL_IN_CONVERSION=1              the conversion SIGKILLs itself once its output is written, before the
                                               rename (checkpoint.convert_to_universal)
    WITSCALE_SLOW_REFERENCE=<seconds>          tools/precompute_reference.py waits that long before writing, on a
                                               Slurm job's first attempt only (a long 70B reference pass, preempted)
"""
from __future__ import annotations

import os


def injected(kind: str, step: int) -> bool:
    spec = os.environ.get("WITSCALE_FAULT", "").split(":")
    if len(spec) < 2 or spec[0] != kind or int(spec[1]) != step:
        return False
    if len(spec) > 2 and spec[2] == "*":
        return True
    import torch.distributed as dist
    return dist.get_rank() == (int(spec[2]) if len(spec) > 2 else 0)


def nonfinite_weight(step: int):
    """The value (nan or inf) ``nan_loss`` / ``inf_loss`` puts into this rank's weights at ``step``, else None."""
    for kind, value in (("nan_loss", float("nan")), ("inf_loss", float("inf"))):
        if injected(kind, step):
            return value
    return None
def first_attempt() -> bool:
    """Not a requeued Slurm job (faults meant to fire once, e.g. ``stop_in_step``, then let the rerun pass)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) == 0


def slow_conversion_seconds() -> float:
    """WITSCALE_SLOW_CONVERSION=<seconds>: the universal-checkpoint conversion takes that much longer (70B's)."""
    return float(os.environ.get("WITSCALE_SLOW_CONVERSION", "0") or 0)


def kill_in_conversion() -> bool:
    return os.environ.get("WITSCALE_KILL_IN_CONVERSION") == "1"


def slow_save_seconds() -> float:
    return float(os.environ.get("WITSCALE_SLOW_SAVE", "0") or 0)


def slow_reference_seconds() -> float:
    if int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0:
        return 0.0
    return float(os.environ.get("WITSCALE_SLOW_REFERENCE", "0") or 0)
