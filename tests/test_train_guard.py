"""Nothing non-finite trains, saves or exports, and one run per output directory.

The non-finite value is injected at the loss (WITSCALE_FAULT=nan_loss|inf_loss:<step>: the step's token weights on
rank 0 become NaN / inf, witscale/training/faults.py), so these tests do not depend on the loader's own
validation of a dataset's weights channel."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import REPO_ROOT
from tests.distributed import run_distributed
from tests.test_train_cli_operations import _args, _env, _torchrun, run_inputs  # noqa: F401 - fixture
from tests.train_helpers import TINY, ds_config, random_packed
from witscale.training import checkpoint
from witscale.training.guard import NonFiniteError, check_step
from witscale.training.run_lock import LOCK_NAME, OutputDirRefused, OutputDirLock


# --- the guard's policy -------------------------------------------------------------------------------
class _Result:
    def __init__(self, step, nonfinite=True, update_skipped=True):
        self.step, self.nonfinite, self.update_skipped = step, nonfinite, update_skipped
        self.loss, self.raw_grad_norm = float("nan"), float("inf")


class _Batch:
    epoch, step_in_epoch = 0, 4


def test_guard_skips_at_most_n_steps_then_stops_naming_step_and_rows():
    skipped = []
    rows = lambda: np.arange(100, 120)          # noqa: E731
    check_step(_Result(1, nonfinite=False), _Batch, rows, skipped, 0)          # finite: nothing to do
    check_step(_Result(5), _Batch, rows, skipped, 1)
    assert skipped == [5]
    with pytest.raises(NonFiniteError) as e:
        check_step(_Result(9), _Batch, rows, skipped, 1)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("step 9: non-finite loss or gradient norm (loss nan, gradient norm inf)")
    assert "at data epoch 0, step 4 of the epoch, rows 100, 101" in msg and "(20 rows)" in msg
    assert "already used by steps 5" in msg
    with pytest.raises(NonFiniteError, match="the update was applied"):       # cannot be undone: stop
        check_step(_Result(10, update_skipped=False), _Batch, rows, [], 5)
    with pytest.raises(NonFiniteError, match="pass --skip-nonfinite N"):      # the default: stop at once
        check_step(_Result(2), _Batch, rows, [], 0)


# --- retention ------------------------------------------------------------------------------------------
def _tag(root, step, finite):
    d = root / checkpoint.tag_for(step)
    d.mkdir(parents=True)
    state = {"step": step} if finite is None else {"step": step, "finite": finite}
    (d / checkpoint.STATE_FILE).write_text(json.dumps(state))


def test_retention_never_prunes_the_newest_finite_checkpoint(tmp_path):
    for step, finite in ((2, True), (4, True), (6, None), (8, False)):
        _tag(tmp_path, step, finite)
    trash = checkpoint._retire(str(tmp_path), checkpoint.tag_for(8), keep=1)
    # keep=1 would keep step 8 alone; step 4, the newest recorded finite, stays too
    assert sorted(os.path.basename(t) for t in trash) == [".deleting.step_00000002", ".deleting.step_00000006"]
    assert checkpoint.complete_tags(str(tmp_path)) == ["step_00000004", "step_00000008"]
    _tag(tmp_path, 10, True)                    # a finite newest checkpoint: the plain keep-last-K rule
    checkpoint._retire(str(tmp_path), checkpoint.tag_for(10), keep=1)
    assert checkpoint.complete_tags(str(tmp_path)) == ["step_00000010"]


# --- skipping is exact: the parameters equal a run without that step -----------------------------------
def _skip_worker(rank, world, stage, poison, skip):
    """3 steps with the step-2 weights poisoned on rank 0 (skip=True), or step 1, step 2's data dropped
    unseen, step 3 (skip=False): the run that never had step 2's update."""
    import torch

    from witscale.data.loader import PackedLoader
    from witscale.data.weighting import build_weight_table
    from witscale.model import ModelConfig
    from witscale.parallel.topology import ParallelDims, Topology
    from witscale.training.build import build_module
    from witscale.training.distributed import init_distributed
    from witscale.training.trainer import Trainer

    if skip:
        os.environ["WITSCALE_FAULT"] = f"{poison}:2"
    init_distributed()
    cfg = ModelConfig.from_dict(TINY)
    topo = Topology(ParallelDims(world, 1, 1, stage, cfg))
    config = ds_config(stage, 1, 2, topo.dp)
    torch.manual_seed(0)
    module = build_module(cfg, topo, config, model_dir=None, seed=0)
    loader = PackedLoader(random_packed(16, 48, cfg.vocab_size, 1), build_weight_table(0.2, 1.0), micro_batch_size=1,
                          grad_accum=2, dp_size=topo.dp, dp_rank=topo.dp_rank, seed=0)
    trainer = Trainer(module=module, ds_config=config, loader=loader, topo=topo, normalization="nonzero", lr=1e-2,
                      weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8, total_steps=3, warmup_ratio=0.0)
    results = []
    for step in (1, 2, 3):
        batch = loader.next_step()
        if step == 2 and not skip:
            continue
        results.append(trainer.train_step(batch).as_dict())
    finite = trainer.weights_finite()
    return {"results": results, "skipped_steps": trainer.engine.skipped_steps, "finite": finite,
            "params": {k: v.numpy() for k, v in trainer.full_dense_state_dict().items()}}


@pytest.mark.slow
@pytest.mark.parametrize("stage,world,poison", [(0, 1, "nan_loss"), (2, 2, "inf_loss")])
def test_a_skipped_step_leaves_the_parameters_of_a_run_without_it(stage, world, poison):
    """fp32 ZeRO-0 (witscale's GlobalNormClipping skips) and ZeRO-2 dp2 (DeepSpeed's overflow check skips; the
    bad value only on rank 0): the update is not applied, the schedule not advanced, and the parameters after
    step 3 equal — bit for bit — those of a run that never took step 2."""
    skipped = run_distributed(_skip_worker, world, stage, poison, True)
    reference = run_distributed(_skip_worker, world, stage, poison, False)
    for rank in range(world):
        got = skipped[rank]
        assert got["skipped_steps"] == 1 and got["finite"]
        bad = got["results"][1]
        assert bad["step"] == 2 and bad["nonfinite"] and bad["update_skipped"]
        assert not any(r.get("nonfinite") for r in (got["results"][0], got["results"][2]))
        assert got["results"][2]["loss"] == reference[rank]["results"][1]["loss"]
        for name, value in reference[rank]["params"].items():
            np.testing.assert_array_equal(got["params"][name], value, err_msg=name)


# --- the CLI: stop, skip ----------------------------------------------------------------------------------
def _rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def _single(args, env=None, wait=True):
    proc = subprocess.Popen([sys.executable, "witscale/train.py", *args], cwd=REPO_ROOT, env=env or _env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


@pytest.mark.slow
def test_nan_loss_stops_the_run_keeps_the_last_checkpoint_saves_and_exports_nothing(run_inputs, tmp_path):
    """ZeRO-3 dp2 under torchrun, --keep-checkpoints 1: step 3 is NaN → the ranks exit 3 (torchrun: 1) with one
    line naming the step and its rows; the step-2 checkpoint stays, nothing is saved after it, no export."""
    code, log = _torchrun(_args(run_inputs, tmp_path, 6, "--save-steps", "2", "--keep-checkpoints", "1",
                                "--export-hf", str(tmp_path / "hf")), env=_env(WITSCALE_FAULT="nan_loss:3"))
    assert code != 0 and "exitcode  : 3" in log, log
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: step 3: non-finite loss or gradient norm"), log
    assert "at data epoch 1, step 0 of the epoch, rows " in errors[0] and "(8 rows)" in errors[0]
    ckpts = tmp_path / "checkpoints"
    assert open(ckpts / "latest").read().strip() == "step_00000002"
    assert [t for t in os.listdir(ckpts) if t.startswith(("step_", ".deleting."))] == ["step_00000002"]
    assert json.load(open(ckpts / "step_00000002" / checkpoint.STATE_FILE))["finite"] is True
    assert not (tmp_path / "hf").exists()
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[2]["loss"] is None and rows[2]["nonfinite"]


@pytest.mark.slow  # trains through witscale/train.py in a subprocess
def test_inf_loss_stops_a_zero0_run(run_inputs, tmp_path):
    code, _, err = _single(_args(run_inputs, tmp_path, 4, "--ds_config", "ds_configs/zero0.json", "--save-steps", "1"),
                           env=_env(WITSCALE_FAULT="inf_loss:2"))
    assert code == 3, err
    assert err.strip().splitlines()[-1].startswith("error: step 2: non-finite loss or gradient norm (loss inf"), err
    assert open(tmp_path / "checkpoints" / "latest").read().strip() == "step_00000001"
    assert not (tmp_path / "checkpoints" / "step_00000002").exists()


@pytest.mark.slow  # trains through witscale/train.py in a subprocess
def test_skip_nonfinite_skips_the_step_logs_it_and_trains_on(run_inputs, tmp_path):
    args = _args(run_inputs, tmp_path, 4, "--ds_config", "ds_configs/zero0.json", "--save-steps", "2",
                 "--skip-nonfinite", "1", "--export-hf", str(tmp_path / "hf"), "--export-dtype", "fp32")
    code, out, err = _single(args, env=_env(WITSCALE_FAULT="nan_loss:2"))
    assert code == 0, err
    assert "step 2: non-finite loss or gradient norm" in out and "update skipped (1 of --skip-nonfinite 1)" in out
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[1]["update_skipped"] and all(r["loss"] is not None for r in rows[2:])
    state = json.load(open(tmp_path / "checkpoints" / "step_00000004" / checkpoint.STATE_FILE))
    assert state["finite"] is True and state["skipped_nonfinite_steps"] == [2]
    from safetensors.torch import load_file
    assert all(t.isfinite().all() for t in load_file(tmp_path / "hf" / "model.safetensors").values())


# --- one run per output directory ------------------------------------------------------------------------
def test_a_second_lock_is_refused_naming_the_holder_and_released_on_release(tmp_path):
    first = OutputDirLock(str(tmp_path / "out"))
    first.acquire()
    with pytest.raises(OutputDirRefused) as e:
        OutputDirLock(str(tmp_path / "out")).acquire()
    assert f"pid {os.getpid()}" in str(e.value) and "is in use by another run" in str(e.value)
    first.release()
    again = OutputDirLock(str(tmp_path / "out"))
    again.acquire()
    again.release()


def test_without_flock_an_exclusive_file_with_heartbeat_and_staleness(tmp_path, monkeypatch):
    import errno
    import fcntl

    from witscale.training import run_lock

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_flock)
    out = tmp_path / "out"
    first = OutputDirLock(str(out))
    first.acquire()
    with pytest.raises(OutputDirRefused, match=f"pid {os.getpid()}"):
        OutputDirLock(str(out)).acquire()
    first.release()
    assert not (out / run_lock.HELD_NAME).exists()
    held = out / run_lock.HELD_NAME
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    held.write_text(json.dumps({"host": run_lock.socket.gethostname(), "pid": dead.pid, "started": "x"}))
    taker = OutputDirLock(str(out))
    taker.acquire()                   # this host, pid gone: stale
    taker.release()
    held.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "x"}))
    with pytest.raises(OutputDirRefused, match="host elsewhere"):
        OutputDirLock(str(out)).acquire()        # another host, fresh heartbeat: held
    old = time.time() - run_lock.STALE_S - 60
    os.utime(held, (old, old))
    OutputDirLock(str(out)).acquire()             # its heartbeat stopped: the holder's node died


def _wait_for_step(out, proc, n=1, timeout=180):
    metrics = out / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"no step {n} in {metrics} (exit {proc.poll()})")


@pytest.mark.slow
def test_a_second_run_into_the_same_output_dir_is_refused_in_one_line(run_inputs, tmp_path):
    """A single-process run (its saves slowed) holds the directory; a 2-rank torchrun into it is refused by
    rank 0 in one line naming the holder, every rank leaving, while the first run goes on and exits 0 with
    each step in metrics.jsonl once."""
    args = _args(run_inputs, tmp_path, 4, "--ds_config", "ds_configs/zero0.json", "--save-steps", "2",
                 "--resume", "auto")
    first = _single(args, env=_env(WITSCALE_SLOW_SAVE="30"), wait=False)
    _wait_for_step(tmp_path, first)
    code, log = _torchrun(args)
    assert first.poll() is None, "the first run was to be still running"
    assert code != 0 and log.count("exitcode  : 2") == 2, log      # both ranks exit 2 (torchrun itself: 1)
    errors = [line for line in log.splitlines() if line.startswith("error:") or "[witscale]" in line]
    assert len(errors) == 1 and errors[0].startswith("error: --output-dir "), log
    assert f"pid {first.pid}" in errors[0] and "is in use by another run" in errors[0]
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert [r["step"] for r in _rows(tmp_path) if "loss" in r] == [1, 2, 3, 4]
    assert json.loads(open(tmp_path / LOCK_NAME).read())["pid"] == first.pid


@pytest.mark.slow  # trains through witscale/train.py in a subprocess
def test_the_lock_of_a_killed_run_does_not_block_the_next(run_inputs, tmp_path):
    """A requeued job after a SIGKILL (preemption, a crashed node) finds the lock released by the kernel."""
    args = _args(run_inputs, tmp_path, 3, "--ds_config", "ds_configs/zero0.json", "--save-steps", "1",
                 "--resume", "auto")
    first = _single(args, env=_env(WITSCALE_SLOW_SAVE="60"), wait=False)
    _wait_for_step(tmp_path, first)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    code, out, err = _single(args)
    assert code == 0, err
    assert json.loads(open(tmp_path / LOCK_NAME).read())["pid"] != first.pid
