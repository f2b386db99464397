"""The multi-rank test harness itself: results in rank order, a failing rank's traceback in the parent, a hang
ended at the timeout with a clear error."""
import os
import time

import pytest
import torch
import torch.distributed as dist

from tests.distributed import DistributedTestError, run_distributed


def _ok(rank, world, tag):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return {"rank": rank, "world": world, "tag": tag, "sum": float(t), "omp": os.environ["OMP_NUM_THREADS"],
            "env_rank": int(os.environ["RANK"]), "threads": torch.get_num_threads()}


def _fails_on_rank_1(rank, world):
    if rank == 1:
        raise ValueError("deliberate failure on rank 1")
    t = torch.ones(1)
    dist.all_reduce(t)           # the peers block here until rank 1 is gone
    return rank


def _rank_0_hangs(rank, world):
    if rank == 0:
        time.sleep(60)
    return rank


@pytest.mark.slow
def test_results_come_back_in_rank_order():
    res = run_distributed(_ok, 3, "x")
    assert [r["rank"] for r in res] == [0, 1, 2] == [r["env_rank"] for r in res]
    assert all(r["sum"] == 3.0 and r["world"] == 3 and r["tag"] == "x" for r in res)
    assert all(r["omp"] == "1" and r["threads"] == 1 for r in res)


@pytest.mark.slow
def test_failing_rank_raises_with_its_traceback():
    with pytest.raises(DistributedTestError, match="rank 1 first") as e:
        run_distributed(_fails_on_rank_1, 2, timeout=60)
    assert "ValueError: deliberate failure on rank 1" in str(e.value)
    assert "_fails_on_rank_1" in str(e.value)


@pytest.mark.slow
def test_hang_ends_at_the_timeout():
    t0 = time.monotonic()
    with pytest.raises(DistributedTestError, match=r"did not finish within 3 s; ranks still running: \[0"):
        run_distributed(_rank_0_hangs, 2, timeout=3)
    assert time.monotonic() - t0 < 20


def test_worker_must_be_picklable():
    with pytest.raises(TypeError, match="top-level"):
        run_distributed(lambda rank, world: rank, 2)
