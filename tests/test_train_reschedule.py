"""A resume whose flags change the learning-rate schedule: refused in one line naming the flag, or with
--reschedule continued on the schedule rebuilt for the new length — never a step at lr 0 that the schedule
did not mean. Real single-process CPU runs (ZeRO-0)."""
import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from tests.test_train_config_file import _flags, _losses, _settings, _train, inputs  # noqa: F401 (fixture)


def _expected_lr(peak, step, total, warmup_ratio):
    """The warm-up + cosine factor witscale.training.optim.cosine_with_warmup gives step index ``step``."""
    warmup = math.ceil(total * warmup_ratio)
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


@pytest.mark.slow  # trains through witscale/train.py in a subprocess, three times
def test_a_changed_schedule_is_refused_and_reschedule_continues_on_the_rebuilt_one(inputs, tmp_path):  # noqa: F811
    settings = {**_settings(inputs), "max_steps": 4}
    out = str(tmp_path / "run")
    _train(_flags(settings) + ["--output-dir", out])
    state = json.load(open(os.path.join(out, "checkpoints", "step_00000004", "witscale_state.json")))
    assert state["schedule"]["total_steps"] == 4

    longer = _flags({**settings, "max_steps": 7}) + ["--output-dir", out, "--resume", "auto"]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore")
    res = subprocess.run([sys.executable, "witscale/train.py", *longer], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 2, res.stdout + res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--max-steps 7 (the checkpoint's: 4)" in errors[0] and "--reschedule" in errors[0]
    assert len(_losses(out)) == 4                   # nothing trained

    res = _train(longer + ["--reschedule"])
    assert "--reschedule:" in res.stdout + res.stderr
    rows = _losses(out)
    assert [s for s, _, _ in rows] == [1, 2, 3, 4, 5, 6, 7]
    for step, _, lr in rows[4:]:
        assert lr > 0 or step == 7 and lr == 0, rows          # the 7-step cosine reaches 0 only after its end
        assert math.isclose(lr, _expected_lr(3e-3, step - 1, 7, settings["warmup_ratio"]), rel_tol=1e-9), rows


@pytest.mark.slow  # trains through witscale/train.py in a subprocess, three times
def test_a_changed_lr_on_resume_is_refused_and_reschedule_trains_at_the_new_one(inputs, tmp_path):  # noqa: F811
    """A checkpoint load brings back its peak lr, weight decay and betas: a resume with other flags is refused
    (the user must not believe the new lr in effect), with --reschedule the step's lr is the new schedule's."""
    settings = {**_settings(inputs), "max_steps": 4}
    out = str(tmp_path / "run")
    _train(_flags(settings) + ["--output-dir", out])

    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore")
    changed = _flags({**settings, "lr": 1e-3, "weight_decay": 0.05}) + ["--output-dir", out, "--resume", "auto"]
    res = subprocess.run([sys.executable, "witscale/train.py", *changed], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 2, res.stdout + res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.stderr
    assert "--lr 0.001 (the checkpoint's: 0.003)" in errors[0] and "--weight-decay 0.05" in errors[0], errors
    assert "--reschedule" in errors[0]
    assert len(_losses(out)) == 4                   # nothing trained

    res = _train(_flags({**settings, "max_steps": 6, "lr": 1e-3}) + ["--output-dir", out, "--resume", "auto",
                                                                    "--reschedule"])
    assert "--lr 0.001 (the checkpoint's: 0.003)" in res.stdout + res.stderr
    rows = _losses(out)
    assert [s for s, _, _ in rows] == [1, 2, 3, 4, 5, 6]
    for step, _, lr in rows[4:]:
        assert math.isclose(lr, _expected_lr(1e-3, step - 1, 6, settings["warmup_ratio"]), rel_tol=1e-9), rows
