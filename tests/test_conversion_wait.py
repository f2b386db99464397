"""The universal-checkpoint conversion of a resume at another dp is waited for outside any collective
(checkpoint.universal_tag): a conversion slower than every collective timeout still resumes."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from tests.test_train_cli_operations import _args, _env, _torchrun, _train_losses, run_inputs  # noqa: F401

pytestmark = pytest.mark.slow  # torchrun ranks


def test_a_dp_change_with_a_conversion_longer_than_the_collective_timeout_resumes(run_inputs, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    first = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "witscale/train.py"),
                            *_args(run_inputs, out, 2, "--no-tensorboard")],
                           cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    # dp 1 → 2, the same 4 rows per step (micro 2 × accum 1 × dp 2); every collective times out after 6 s
    # (--dist-timeout 0.1), the conversion takes 15 s longer: the old barrier timed out on rank 1
    args = _args(run_inputs, out, 4, "--no-tensorboard", "--resume", "auto", "--reschedule", "--dist-timeout", "0.1")
    args[args.index("--grad-accum") + 1] = "1"
    code, log = _torchrun(args, env=_env(WITSCALE_SLOW_CONVERSION="15"))
    assert code == 0, log[-4000:]
    assert "converting to a universal checkpoint" in log and "resumed from" in log, log[-4000:]
    assert log.count("was written at") == 1, log[-4000:]          # the layout change said once, not per rank
    assert sorted(_train_losses(out)) == [1, 2, 3, 4]


def _digests(tag_dir) -> dict:
    import hashlib
    found = {}
    for base, dirs, files in os.walk(tag_dir):
        dirs[:] = [d for d in dirs if not d.startswith("universal")]
        for name in files:
            path = os.path.join(base, name)
            found[os.path.relpath(path, tag_dir)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return found


def test_a_conversion_step_killed_midway_leaves_the_checkpoint_and_the_next_start_converts_and_resumes_equal(
        run_inputs, tmp_path):  # noqa: F811
    """witscale.training.layout_conversion, the job step the Slurm templates run before training: SIGKILLed once its
    output is written but before the rename, the checkpoint is as it was (same files, same bytes, no universal/);
    the next start removes the partial output and converts; the training step then loads it without converting,
    and ends on the losses of a resume that converted in-process, uninterrupted."""
    import shutil

    out, ref = tmp_path / "run", tmp_path / "ref"
    first = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "witscale/train.py"),
                            *_args(run_inputs, out, 2, "--no-tensorboard")],
                           cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    shutil.copytree(out, ref)
    tag = out / "checkpoints" / "step_00000002"
    before = _digests(tag)
    convert = [sys.executable, "-m", "witscale.training.layout_conversion", "--output-dir", str(out),
               "--resume", "auto", "--world", "2", "--ds_config", "ds_configs/zero3.json"]
    killed = subprocess.run(convert, cwd=REPO_ROOT, env=_env(WITSCALE_KILL_IN_CONVERSION="1"), capture_output=True,
                            text=True, timeout=600)
    assert killed.returncode == -9, killed.stdout[-3000:] + killed.stderr[-3000:]
    assert _digests(tag) == before and not (tag / "universal").exists()
    assert [p.name for p in tag.iterdir() if p.name.startswith("universal.tmp")], sorted(os.listdir(tag))
    again = subprocess.run(convert, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "removing an interrupted conversion's partial output" in again.stdout, again.stdout
    assert (tag / "universal").is_dir() and not [p for p in tag.iterdir() if p.name.startswith("universal.tmp")]
    assert _digests(tag) == before
    nothing = subprocess.run(convert, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert nothing.returncode == 0 and "nothing to do" in nothing.stdout, nothing.stdout + nothing.stderr

    losses = {}
    for run in (out, ref):      # dp 1 → 2, the same 4 rows per step
        args = _args(run_inputs, run, 4, "--no-tensorboard", "--resume", "auto", "--reschedule")
        args[args.index("--grad-accum") + 1] = "1"
        code, log = _torchrun(args)
        assert code == 0 and "resumed from" in log, log[-4000:]
        assert ("converting to a universal checkpoint" in log) == (run == ref), log[-4000:]
        losses[run] = _train_losses(run)
    assert sorted(losses[out]) == [1, 2, 3, 4] and losses[out] == losses[ref]
