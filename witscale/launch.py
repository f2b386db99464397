"""torchrun for witscale, with preemption that holds: ``python -m witscale.launch [torchrun flags] witscale/train.py …``

torchrun, left to itself, turns a SIGTERM into "stop the workers": it sends them SIGTERM and SIGKILLs them
30 s later (``--shutdown-timeout``), then exits 1 — too soon for a 70B checkpoint, and a failure for Slurm
even when the checkpoint was written. witscale's ranks already know what a TERM or USR1 means
(witscale/training/preemption.py: finish the step, agree, checkpoint, exit 0), so this launcher only has
to make sure the signal reaches them and that nobody kills them while they save:
- torchrun runs as a child with SIGTERM and SIGUSR1 ignored and not in its ``--signals-to-handle``: it
  never acts on them (its workers inherit the ignored dispositions until train.py installs its handlers,
  its first act);
- a TERM or USR1 sent to this process is forwarded to torchrun's workers (the ranks of this node);
- the exit code is torchrun's: 0 when every rank checkpointed and exited 0.
Under Slurm, which signals every process of a step, the ranks then receive the signal twice (directly
and forwarded): harmless, the handler only sets a flag. SIGINT (Ctrl-C) keeps torchrun's meaning: stop.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

FORWARDED = (signal.SIGTERM, signal.SIGUSR1)
# What torchrun itself still handles (and forwards, then kills): interrupts from a terminal.
TORCHRUN_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"


def _children(pid: int) -> list[int]:
    """The direct children of ``pid`` (torchrun's workers), from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # field 4 is the parent pid; the command name (field 2) may hold spaces, so split after ')'
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            out.append(int(entry))
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a.startswith(("--signals-to-handle", "--signals_to_handle")) for a in argv):
        print("witscale.launch: --signals-to-handle is set by the launcher itself", file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--signals-to-handle={TORCHRUN_SIGNALS}", *argv]

    def ignore_forwarded():       # in the child, before exec: torchrun starts with these ignored
        for sig in FORWARDED:
            signal.signal(sig, signal.SIG_IGN)

    proc = subprocess.Popen(cmd, preexec_fn=ignore_forwarded)

    def forward(signum, _frame):
        for pid in _children(proc.pid):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
        print(f"[witscale.launch] {signal.Signals(signum).name} forwarded to the ranks; waiting for their "
              "checkpoint", file=sys.stderr, flush=True)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    signal.signal(signal.SIGINT, lambda s, f: proc.send_signal(signal.SIGINT))
    while True:
        try:
            return proc.wait()
        except InterruptedError:      # a forwarded signal interrupted the wait: keep waiting
            continue


if __name__ == "__main__":
    sys.exit(main())
