"""Damaged checkpoints and pruning: a truncated shard is named in one line, `--resume auto` falls back to the
newest complete checkpoint that loads; old checkpoints are retired at once and deleted in the background."""
import json
import os
import shutil

import torch

from tests.test_train_cli_operations import (_args, _env, _torchrun, _train_losses,  # noqa: F401 - fixtures
                                             reference_run, run_inputs)
from witscale.training import checkpoint


def _truncate(path, keep_fraction=0.5):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep_fraction))


def test_torch_file_problem_names_truncation(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(1000.0)}, good)
    assert checkpoint.torch_file_problem(str(good)) is None
    bad = tmp_path / "bad.pt"
    shutil.copy(good, bad)
    _truncate(bad, 0.9)
    assert "truncated" in checkpoint.torch_file_problem(str(bad))
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert "empty" in checkpoint.torch_file_problem(str(empty))

    tag = tmp_path / "ckpt" / "step_00000001"
    tag.mkdir(parents=True)
    shutil.copy(good, tag / "mp_rank_00_model_states.pt")
    shutil.copy(bad, tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    (tag / checkpoint.STATE_FILE).write_text("{\"step\": 1")
    problems = checkpoint.damaged_files(str(tmp_path / "ckpt"), "step_00000001")
    assert len(problems) == 2 and all("\n" not in p for p in problems)
    assert problems[0].startswith(str(tag / checkpoint.STATE_FILE))
    assert problems[1].startswith(str(tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt") + ": truncated")


def _fake_tag(root, step, complete=True):
    d = root / checkpoint.tag_for(step)
    d.mkdir(parents=True)
    (d / "shard.pt").write_bytes(b"x" * 10)
    if complete:
        (d / checkpoint.STATE_FILE).write_text(json.dumps({"step": step}))


def test_retire_keeps_the_last_k_up_to_latest_and_deletes_in_the_background(tmp_path):
    for step in (2, 4, 6, 8):
        _fake_tag(tmp_path, step)
    _fake_tag(tmp_path, 10)                         # newer than the commit: left by a fall-back, not counted
    _fake_tag(tmp_path, 7, complete=False)          # incomplete: never counted, never touched
    (tmp_path / ".deleting.step_00000001").mkdir()  # a deletion a killed process did not finish
    trash = checkpoint._retire(str(tmp_path), checkpoint.tag_for(8), keep=2)
    assert sorted(os.path.basename(t) for t in trash) == [".deleting.step_00000001", ".deleting.step_00000002",
                                                          ".deleting.step_00000004"]
    assert checkpoint.complete_tags(str(tmp_path)) == ["step_00000006", "step_00000008", "step_00000010"]
    checkpoint._prune(trash)
    checkpoint.wait_for_pruning()
    assert sorted(os.listdir(tmp_path)) == ["step_00000006", "step_00000007", "step_00000008", "step_00000010"]
    assert checkpoint._retire(str(tmp_path), checkpoint.tag_for(8), keep=0) == []


def test_truncated_shard_in_the_newest_checkpoint_falls_back_to_the_previous_one(run_inputs, reference_run, tmp_path):
    """The reference run (8 steps, a checkpoint every 2, keep 2) left step 6 and step 8. Truncating rank 1's
    optimizer shard of step 8 (a file only rank 1 loads) must make both ranks resume from step 6, and the
    replayed steps 7-8 equal the reference."""
    ref = _train_losses(reference_run)
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(reference_run / "checkpoints", ckpts)
    assert open(ckpts / "latest").read().strip() == "step_00000008"
    shard = ckpts / "step_00000008" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    assert shard.exists(), sorted(os.listdir(ckpts / "step_00000008"))
    _truncate(shard)

    code, log = _torchrun(_args(run_inputs, tmp_path, 8, "--save-steps", "2", "--resume",
                                str(ckpts / "step_00000008")))
    assert code != 0, log
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert errors and f"{shard}: truncated" in errors[0], log
    assert "exitcode  : 2" in log and "zip archive" not in log and "witscale/training" not in log, log

    code, log = _torchrun(_args(run_inputs, tmp_path, 8, "--save-steps", "2", "--resume", "auto"))
    assert code == 0, log
    assert f"{shard}: truncated" in log
    assert "falling back to" in log and f"resumed from {ckpts / 'step_00000006'} at step 6" in log, log
    losses = _train_losses(tmp_path)
    assert sorted(losses) == [7, 8]
    for step in (7, 8):
        assert losses[step] == ref[step], f"step {step}: {losses[step]!r} != {ref[step]!r}"
    # step 8 was saved again over the damaged one, which is whole now
    assert open(ckpts / "latest").read().strip() == "step_00000008"
    assert checkpoint.damaged_files(str(ckpts), "step_00000008") == []
    assert checkpoint.complete_tags(str(ckpts)) == ["step_00000006", "step_00000008"]


def _tiny_checkpoints(root, steps, latest):
    for step in steps:
        d = root / checkpoint.tag_for(step)
        d.mkdir(parents=True)
        torch.save({"step": step}, d / "mp_rank_00_model_states.pt")
        torch.save({"opt": torch.zeros(64)}, d / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
        (d / checkpoint.STATE_FILE).write_text(json.dumps({"step": step}))
    (root / checkpoint.LATEST).write_text(checkpoint.tag_for(latest))


def _choose_worker(rank, world_size, roots):
    from witscale.training import checkpoint as ck
    try:
        return ck.choose("auto", roots[rank], torch.device("cpu"))[1]
    except ck.CheckpointError as e:
        return f"error: {e}"


def test_ranks_agree_on_the_fallback_when_only_one_rank_sees_damage(tmp_path):
    """Each rank reads its own copy (as a node-local copy would be): rank 1's step 6 is truncated, so both
    ranks must choose step 4; `latest` naming an incomplete tag falls back the same way."""
    from tests.distributed import run_distributed

    roots = []
    for r in range(2):
        root = tmp_path / f"rank{r}"
        _tiny_checkpoints(root, (2, 4, 6), latest=6)
        roots.append(str(root))
    _truncate(os.path.join(roots[1], "step_00000006", "zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    assert run_distributed(_choose_worker, 2, roots) == ["step_00000004", "step_00000004"]

    for r in range(2):      # latest names a tag being rewritten (no witscale_state.json): fall back to 4
        os.unlink(os.path.join(roots[r], "step_00000006", checkpoint.STATE_FILE))
    assert run_distributed(_choose_worker, 2, roots) == ["step_00000004", "step_00000004"]

    for r in range(2):      # nothing older loads either: one line naming the file
        _truncate(os.path.join(roots[r], "step_00000004", "mp_rank_00_model_states.pt"))
        _truncate(os.path.join(roots[r], "step_00000002", "mp_rank_00_model_states.pt"))
    out = run_distributed(_choose_worker, 2, roots)
    assert all(o.startswith("error: checkpoint ") and "step_00000002/mp_rank_00_model_states.pt: truncated" in o
               and "no older complete checkpoint loads" in o and "\n" not in o for o in out), out
