"""SLURM-style preemption: SIGUSR1 / SIGTERM → finish the step, checkpoint on every rank, exit 0.

The handler only sets a flag (safe inside a signal handler). ``install()`` is called first thing in
``main`` — before the slow imports and DeepSpeed start-up — because SLURM's ``--signal=USR1@N`` can arrive
early. At each step boundary the ranks agree with one all-reduce (MAX), so a signal that reached only
some ranks still stops all of them at the same step.
"""
from __future__ import annotations

import signal

_received: list[int] = []


def _handler(signum, frame):  # noqa: ARG001
    _received.append(signum)


def install(signals=(signal.SIGUSR1, signal.SIGTERM)) -> None:
    for sig in signals:
        signal.signal(sig, _handler)


def requested_locally() -> bool:
    return bool(_received)


def signal_names() -> str:
    return ", ".join(signal.Signals(s).name for s in sorted(set(_received)))


def agreed(group=None, device=None) -> bool:
    """Collective: True on every rank if any rank received a preemption signal. ``device``: where the
    backend's collectives run (the trainer's device: a GPU for NCCL, the CPU for gloo). One tiny all-reduce
    and one host read per optimizer step."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1 if _received else 0], dtype=torch.int32, device=device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item())
