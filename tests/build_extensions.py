"""Build the DeepSpeed JIT extensions the test suite loads, once, before `make test` starts its parallel workers.

    python tests/build_extensions.py        # the Makefile's `test` target runs it first

DeepSpeed compiles FusedAdam (ZeRO >= 1 and bf16 runs) and, on the CPU, its shared-memory comm op (a DeepSpeed
engine started without witscale's init_distributed) the first time a process loads them, in torch's build
directory behind torch's FileBaton lock. Left to the tests, that first build (minutes of two compilers on a 2-core
machine) runs inside whichever rank of whichever worker gets there first, under that test's timeout, while the
other workers' ranks wait on the lock: a rank killed at its timeout mid-build leaves the lock behind, and every
later test that loads the op waits for it (until its own timeout). Built here, in one process with no timeout,
the tests only load the result. A machine that cannot build them (no compiler) is told so in one line; the tests
then take the paths they test for that case (witscale/training/optim.py: torch's AdamW instead of FusedAdam).
"""
from __future__ import annotations

import os
import sys
import time

# What the suite loads: FusedAdam (witscale/training/optim.py) and the CPU comm op (deepspeed/comm/torch.py).
EXTENSIONS = ("FusedAdamBuilder", "ShareMemCommBuilder")


def main() -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator

    for name in EXTENSIONS:
        builder = get_accelerator().create_op_builder(name)
        if builder is None:
            continue
        start = time.monotonic()
        try:
            builder.load(verbose=False)
        except Exception as e:  # noqa: BLE001 - the tests cover the no-extension case; say why and go on
            print(f"tests/build_extensions.py: {name} not built ({type(e).__name__}: {e}); the tests that need it "
                  "build or skip it themselves", file=sys.stderr)
            continue
        print(f"tests/build_extensions.py: {name} ready in {time.monotonic() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
