"""The MPI path: ranks discovered through mpi4py (OMPI_* variables), no torchrun. `mpirun -np 2` on the CPU,
and `srun --mpi=pmix` through train_7b.sh (LAUNCHER=srun-mpi) when the local Slurm is up. Skipped when
mpirun is missing, unless WITSCALE_REQUIRE_SLURM=1."""
from __future__ import annotations

import shutil

import pytest

from tests.conftest import REPO_ROOT
from tests.distributed import run_launcher
from tests.slurm_helpers import PY, TRAIN, cpu_env, make_tiny_inputs, train_flags, train_losses, unavailable, world_of

pytestmark = pytest.mark.slow  # mpirun and srun ranks


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, sp_model_path):
    return make_tiny_inputs(tmp_path_factory.mktemp("mpi_data"), sp_model_path)


def _port_below_the_ephemeral_range() -> int:
    """A port no other process is given by the kernel (bind to port 0 draws from 32768-60999): a port picked by
    binding port 0 and closing could be handed to a parallel test's store before rank 0 binds it. This file's tests
    run one at a time (tests/conftest.py, the group "slurm-mpi"); the Slurm templates' ports are 20000-32767."""
    import socket
    for port in range(19500, 19600):
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 19500-19599")


def test_mpirun_two_ranks_train_as_one_world(tiny, tmp_path):
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        unavailable("mpirun is not installed (apt-get install openmpi-bin, or slurm/local/install.sh)")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        unavailable("mpi4py is not installed in this environment")
    out = tmp_path / "out"
    env = cpu_env(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_btl="self,tcp")
    cmd = [mpirun, "--oversubscribe", "--bind-to", "none", "-np", "2", "-x", "DS_ACCELERATOR", "-x", "OMP_NUM_THREADS",
           "-x", "PYTHONWARNINGS", PY, TRAIN, *train_flags(tiny, out, 4)]
    res = run_launcher(cmd, timeout=300, cwd=REPO_ROOT, env=env)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert world_of(out) == 2, res.stdout[-4000:]
    assert sorted(train_losses(out)) == [1, 2, 3, 4]


def test_mpirun_keeps_the_computed_rendezvous(tiny, tmp_path):
    """MASTER_ADDR set by the launcher (slurm/common.sh: the first node's NodeAddr) is the rendezvous: DeepSpeed's
    MPI discovery would replace it with the first word of `hostname -I` (0.19.8, deepspeed/comm/comm.py)."""
    import json

    mpirun = shutil.which("mpirun")
    if mpirun is None:
        unavailable("mpirun is not installed (apt-get install openmpi-bin, or slurm/local/install.sh)")
    port = _port_below_the_ephemeral_range()
    out = tmp_path / "out"
    env = cpu_env(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_btl="self,tcp",
                  MASTER_ADDR="127.0.0.2", MASTER_PORT=port)     # loopback, but not what `hostname -I` says
    cmd = [mpirun, "--oversubscribe", "--bind-to", "none", "-np", "2", "-x", "DS_ACCELERATOR", "-x", "OMP_NUM_THREADS",
           "-x", "PYTHONWARNINGS", "-x", "MASTER_ADDR", "-x", "MASTER_PORT", PY, TRAIN, *train_flags(tiny, out, 2)]
    res = run_launcher(cmd, timeout=300, cwd=REPO_ROOT, env=env)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    effective = json.loads((out / "effective_config.json").read_text())
    assert effective["rendezvous"] == f"127.0.0.2:{port}" and effective["layout"]["world"] == 2
