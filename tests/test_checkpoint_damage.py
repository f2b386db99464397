"""Damaged checkpoints and pruning: a truncated shard is named in one line, `--resume auto` falls back to the
newest complete checkpoint that loads; old checkpoints are retired at once and deleted in the background."""
import json
import os
import shutil

import pytest
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


@pytest.mark.slow
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


def _tiny_checkpoints(root, steps, latest, digests=False):
    """Two-rank-shaped tags: rank 0 wrote the model states, rank 1 its optimizer shard; with ``digests`` the
    state file records them as ``checkpoint.save`` does."""
    for step in steps:
        d = root / checkpoint.tag_for(step)
        d.mkdir(parents=True)
        torch.save({"step": step, "w": torch.arange(4096.0)}, d / "mp_rank_00_model_states.pt")
        torch.save({"opt": torch.arange(4096.0) + step}, d / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
        state = {"step": step, "loader": {}}
        if digests:
            files = {**checkpoint.digest_files(str(d), ["mp_rank_00_model_states.pt"], 0),
                     **checkpoint.digest_files(str(d), ["zero_pp_rank_1_mp_rank_00_optim_states.pt"], 1)}
            state["digests"] = {"algorithm": checkpoint.DIGEST, "files": files}
        (d / checkpoint.STATE_FILE).write_text(json.dumps(state))
    (root / checkpoint.LATEST).write_text(checkpoint.tag_for(latest))


def _flip_middle(path, n=64):
    """Invert ``n`` bytes in the middle of the file: inside a tensor's data, the zip structure intact."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        chunk = f.read(n)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))


def _choose_worker(rank, world_size, roots):
    from witscale.training import checkpoint as ck
    try:
        return ck.choose("auto", roots[rank], torch.device("cpu"))[1]
    except ck.CheckpointError as e:
        return f"error: {e}"


@pytest.mark.slow
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


def test_digests_name_flipped_bytes_a_missing_file_and_a_misshapen_state(tmp_path):
    """Bytes flipped inside a shard pass the zip check (torch_file_problem) but not the recorded sha256; each
    rank verifies the files it wrote (world 2: rank 0 the model states, rank 1 its optimizer shard)."""
    _tiny_checkpoints(tmp_path, (2,), latest=2, digests=True)
    tag = checkpoint.tag_for(2)
    optim = tmp_path / tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    assert checkpoint.check_tag(str(tmp_path), tag, 0, 2) == ([], True)
    assert checkpoint.check_tag(str(tmp_path), tag, 1, 2) == ([], True)
    _flip_middle(optim)
    assert checkpoint.torch_file_problem(str(optim)) is None            # structurally whole
    assert checkpoint.damaged_files(str(tmp_path), tag, 0, 2) == []     # not rank 0's file
    [problem] = checkpoint.damaged_files(str(tmp_path), tag, 1, 2)
    assert problem.startswith(f"{optim}: sha256 ") and "recorded at save" in problem, problem
    assert checkpoint.damaged_files(str(tmp_path), tag) == [problem]    # one rank verifies everything

    model = tmp_path / tag / "mp_rank_00_model_states.pt"
    model.unlink()
    assert checkpoint.damaged_files(str(tmp_path), tag, 0, 2) == [
        f"{model}: missing (listed in {checkpoint.STATE_FILE})"]

    state = tmp_path / tag / checkpoint.STATE_FILE
    for text, what in (("[]", "not a JSON object but list"), ('{"step": "x"}', "'step' is 'x', not a step number"),
                       ('{"step": 2}', "no 'loader'"), ('{"step": 2, "loader": {}, "digests": {"files": 1}}',
                                                         "'digests' is not {algorithm, files}"),
                       ('{"step": 2, "loader": {}, "digests": {"algorithm": "sha256", "files": '
                        '{"../../etc/passwd": {"bytes": 1, "sha256": "0"}}}}', "'digests' entry")):
        state.write_text(text)
        problems = checkpoint.damaged_files(str(tmp_path), tag)
        assert problems and problems[0].startswith(f"{state}: {what}"), (text, problems)


def _choose_cases_worker(rank, world_size, root, cases):
    """Each case: a function name of this module that damages ``root`` (rank 0 only, then a barrier), then
    what ``choose`` returns on this rank (a tag or the error line)."""
    import torch.distributed as dist
    from tests import test_checkpoint_damage as t
    from witscale.training import checkpoint as ck

    out = []
    for case, spec in cases:
        if rank == 0:
            getattr(t, case)(root)
        dist.barrier()
        try:
            found = ck.choose(spec, root, torch.device("cpu"))
            out.append(found and found[1])
        except ck.CheckpointError as e:
            out.append(f"error: {e}")
        dist.barrier()
    return out


def _latest_empty(root):
    with open(os.path.join(root, "latest"), "w"):
        pass


def _latest_garbage(root):
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("../../etc\x00garbage\n")


def _latest_step6(root):
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("step_00000006")


def _state6_list(root):
    with open(os.path.join(root, "step_00000006", checkpoint.STATE_FILE), "w") as f:
        f.write("[]")


def _state6_step_x(root):
    with open(os.path.join(root, "step_00000006", checkpoint.STATE_FILE), "w") as f:
        f.write('{"step": "x", "loader": {}}')


def _model6_deleted(root):
    _tiny_checkpoints_restore(root, 6)
    os.unlink(os.path.join(root, "step_00000006", "mp_rank_00_model_states.pt"))


def _optim6_flipped(root):
    _tiny_checkpoints_restore(root, 6)
    _flip_middle(os.path.join(root, "step_00000006", "zero_pp_rank_1_mp_rank_00_optim_states.pt"))


def _model6_crafted(root):       # its digest forged too: only the pickle gives it away
    _tiny_checkpoints_restore(root, 6)
    d = os.path.join(root, "step_00000006")
    torch.save({"module": _Payload(f"touch {os.path.join(root, 'pwned')}")}, os.path.join(d, "mp_rank_00_model_states.pt"))
    with open(os.path.join(d, checkpoint.STATE_FILE)) as f:
        state = json.load(f)
    state["digests"]["files"].update(checkpoint.digest_files(d, ["mp_rank_00_model_states.pt"], 0))
    with open(os.path.join(d, checkpoint.STATE_FILE), "w") as f:
        json.dump(state, f)


def _tiny_checkpoints_restore(root, step):
    from pathlib import Path
    shutil.rmtree(os.path.join(root, checkpoint.tag_for(step)))
    os.unlink(os.path.join(root, "latest"))
    _tiny_checkpoints(Path(root), (step,), latest=step, digests=True)


@pytest.mark.slow
def test_auto_falls_back_past_a_bad_latest_a_misshapen_state_and_damaged_files(tmp_path):
    """2 ranks, tags 2/4/6 with digests: every kind of damage to the newest makes both ranks choose step 4
    (a bad `latest`: the newest complete tag, 6); `--resume PATH` of the damaged tag is one line naming it."""
    from tests.distributed import run_distributed

    _tiny_checkpoints(tmp_path, (2, 4, 6), latest=6, digests=True)
    six = str(tmp_path / "step_00000006")
    cases = [("_latest_empty", "auto"), ("_latest_garbage", "auto"), ("_latest_step6", "auto"),
             ("_state6_list", "auto"), ("_state6_list", six), ("_state6_step_x", "auto"),
             ("_model6_deleted", "auto"), ("_model6_deleted", six),
             ("_optim6_flipped", "auto"), ("_optim6_flipped", six), ("_model6_crafted", "auto"),
             ("_model6_crafted", six)]
    results = run_distributed(_choose_cases_worker, 2, str(tmp_path), cases)
    assert results[0] == results[1], results
    got = dict(zip((f"{c}:{s}" for c, s in cases), results[0]))
    assert got["_latest_empty:auto"] == got["_latest_garbage:auto"] == got["_latest_step6:auto"] == "step_00000006"
    for case in ("_state6_list", "_state6_step_x", "_model6_deleted", "_optim6_flipped", "_model6_crafted"):
        assert got[f"{case}:auto"] == "step_00000004", (case, got)
    state = os.path.join(six, checkpoint.STATE_FILE)
    for case, named in (("_state6_list", f"{state}: not a JSON object but list"),
                        ("_model6_deleted", f"{six}/mp_rank_00_model_states.pt: missing"),
                        ("_optim6_flipped", f"{six}/zero_pp_rank_1_mp_rank_00_optim_states.pt: sha256 "),
                        ("_model6_crafted", f"{six}/mp_rank_00_model_states.pt: refused: it asks to call posix.system")):
        line = got[f"{case}:{six}"]
        assert line.startswith(f"error: checkpoint {six} cannot be loaded: {named}") and "\n" not in line, line
    assert not (tmp_path / "pwned").exists()


def test_crafted_pickle_is_refused_in_one_line_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": _Payload(f"touch {marker}")}, bad)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.safe_load(str(bad))
    assert str(e.value).startswith(f"{bad}: refused: it asks to call posix.system") and "\n" not in str(e.value)
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.refuse_unsafe_pickles(str(tmp_path))
    assert not marker.exists()


class _Payload:
    """Unpickled by a plain torch.load(weights_only=False), it runs a shell command."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _deepspeed_kinds_worker(rank, world_size, out):
    """Save a small DeepSpeed checkpoint of each kind witscale trains (ZeRO-0…3, fp32 and bf16, pipeline at
    ZeRO-0/1) and load every file back through ``safe_load``: the allow-list covers what DeepSpeed pickles."""
    import deepspeed
    from deepspeed.pipe import LayerSpec, PipelineModule
    from witscale.training import checkpoint as ck

    loaded = {}
    for stage, bf16, pipe in [(0, False, False), (0, False, True), (1, False, False), (1, True, False),
                              (1, False, True), (1, True, True), (2, False, False), (2, True, False),
                              (3, False, False), (3, True, False)]:
        name = f"z{stage}_{'bf16' if bf16 else 'fp32'}{'_pipe' if pipe else ''}"
        cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 10 ** 9,
               "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "zero_optimization": {"stage": stage},
               "bf16": {"enabled": bf16}}
        if bf16:
            cfg["data_types"] = {"grad_accum_dtype": "fp32"}
        if pipe:
            model = PipelineModule([LayerSpec(torch.nn.Linear, 8, 8), LayerSpec(torch.nn.Linear, 8, 8)],
                                   num_stages=1, loss_fn=lambda o, y: (o - y).pow(2).mean())
        else:
            model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        dtype = torch.bfloat16 if bf16 else torch.float32
        if pipe:
            engine.train_batch(iter([(torch.randn(1, 8, dtype=dtype), torch.randn(1, 8, dtype=dtype))]))
        else:
            loss = engine(torch.randn(1, 8, dtype=dtype)).float().pow(2).mean()
            engine.backward(loss)
            engine.step()
        engine.save_checkpoint(os.path.join(out, name), tag="t")
        files = sorted(f for f in os.listdir(os.path.join(out, name, "t")) if f.endswith(".pt"))
        for f in files:
            ck.safe_load(os.path.join(out, name, "t", f))
        loaded[name] = (type(engine.optimizer).__name__, files)
    return loaded


@pytest.mark.slow
def test_every_deepspeed_checkpoint_kind_loads_through_the_allow_list(tmp_path):
    from tests.distributed import run_distributed

    [loaded] = run_distributed(_deepspeed_kinds_worker, 1, str(tmp_path), timeout=600)
    assert loaded["z1_bf16_pipe"][0] == "BF16_Optimizer" and loaded["z3_bf16"][0] == "DeepSpeedZeroOptimizer_Stage3"
    assert any("optim_states" in f for f in loaded["z2_fp32"][1]) and any(
        f.startswith("layer_") for f in loaded["z1_fp32_pipe"][1]), loaded


def _copy_reference(reference_run, tmp_path):
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(reference_run / "checkpoints", ckpts)
    assert checkpoint.complete_tags(str(ckpts)) == ["step_00000006", "step_00000008"]
    return ckpts


def _errors(log):
    return [line for line in log.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_flipped_bytes_in_an_optimizer_shard_fall_back_and_path_is_refused(run_inputs, reference_run, tmp_path):
    """64 bytes flipped inside rank 1's optimizer shard of step 8 (an Adam moment; the zip structure intact,
    which used to load silently): `--resume PATH` is refused in one line naming the file and both digests,
    `--resume auto` resumes from step 6 and replays steps 7-8 bit for bit."""
    ref = _train_losses(reference_run)
    ckpts = _copy_reference(reference_run, tmp_path)
    shard = ckpts / "step_00000008" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    _flip_middle(shard)
    assert checkpoint.torch_file_problem(str(shard)) is None

    code, log = _torchrun(_args(run_inputs, tmp_path, 8, "--save-steps", "2", "--resume",
                                str(ckpts / "step_00000008")))
    assert code != 0 and "exitcode  : 2" in log, log
    errors = _errors(log)
    assert errors and f"{shard}: sha256 " in errors[0] and "recorded at save" in errors[0], log
    assert "witscale/training" not in log, log      # no traceback of ours (torchrun prints its own)

    code, log = _torchrun(_args(run_inputs, tmp_path, 8, "--save-steps", "2", "--resume", "auto"))
    assert code == 0, log
    assert f"{shard}: sha256 " in log and f"resumed from {ckpts / 'step_00000006'} at step 6" in log, log
    losses = _train_losses(tmp_path)
    assert sorted(losses) == [7, 8] and all(losses[s] == ref[s] for s in (7, 8)), (losses, ref)
    assert checkpoint.damaged_files(str(ckpts), "step_00000008") == []      # saved again, whole


@pytest.mark.slow
def test_old_checkpoint_without_digests_resumes_past_a_garbage_latest(run_inputs, reference_run, tmp_path):
    """A checkpoint written before digests (its state file has none) still resumes, with its structure
    checked and one log line saying so; a `latest` naming garbage falls back to the newest complete tag."""
    ref = _train_losses(reference_run)
    ckpts = _copy_reference(reference_run, tmp_path)
    shutil.rmtree(ckpts / "step_00000008")
    state_path = ckpts / "step_00000006" / checkpoint.STATE_FILE
    state = json.loads(state_path.read_text())
    assert state["digests"]["algorithm"] == "sha256" and "rng_rank00001.pt" in state["digests"]["files"]
    del state["digests"]
    state_path.write_text(json.dumps(state))
    (ckpts / "latest").write_text("not a tag\n")

    code, log = _torchrun(_args(run_inputs, tmp_path, 8, "--save-steps", "2", "--resume", "auto"))
    assert code == 0, log
    assert f"{ckpts / 'latest'} names 'not a tag', which is not a checkpoint tag" in log, log
    assert log.count("has no digests") == 1 and "checked for structure only" in log, log
    assert f"resumed from {ckpts / 'step_00000006'} at step 6" in log, log
    losses = _train_losses(tmp_path)
    assert sorted(losses) == [7, 8] and all(losses[s] == ref[s] for s in (7, 8)), (losses, ref)
    assert "digests" in json.loads((ckpts / "step_00000008" / checkpoint.STATE_FILE).read_text())


@pytest.mark.slow
def test_crafted_pickle_in_a_checkpoint_is_refused_on_resume_and_never_runs(run_inputs, reference_run, tmp_path):
    """A model-states file replaced by a pickle that would run `touch MARKER` — its digest updated too, as
    whoever crafted it would: the resume refuses it in one line naming the file; the command never runs."""
    ckpts = _copy_reference(reference_run, tmp_path)
    marker = tmp_path / "pwned"
    tag = ckpts / "step_00000008"
    bad = tag / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    assert bad.exists(), sorted(os.listdir(tag))
    torch.save({"module": _Payload(f"touch {marker}")}, bad)
    state = json.loads((tag / checkpoint.STATE_FILE).read_text())
    state["digests"]["files"].update(checkpoint.digest_files(str(tag), [bad.name], 0))
    (tag / checkpoint.STATE_FILE).write_text(json.dumps(state))

    code, log = _torchrun(_args(run_inputs, tmp_path, 8, "--save-steps", "2", "--resume", str(tag)))
    assert code != 0 and "exitcode  : 2" in log, log
    errors = _errors(log)
    assert errors and f"{bad}: refused: it asks to call posix.system" in errors[0], log
    assert "witscale/training" not in log, log      # no traceback of ours (torchrun prints its own)
    assert not marker.exists()


@pytest.mark.slow
def test_kill9_of_every_rank_during_a_save_resumes_from_the_previous_checkpoint(run_inputs, reference_run, tmp_path):
    """SIGKILL of both ranks right after DeepSpeed wrote their step-4 files (no rng files, no digests, no
    commit): `--resume auto` loads step 2 and replays steps 3-8 bit for bit."""
    ref = _train_losses(reference_run)
    code, log = _torchrun(_args(run_inputs, tmp_path, 8, "--save-steps", "2"),
                          env=_env(WITSCALE_FAULT="kill_in_save:4:*"))
    assert code != 0, log
    ckpts = tmp_path / "checkpoints"
    assert open(ckpts / "latest").read().strip() == "step_00000002"
    assert (ckpts / "step_00000004").is_dir() and not (ckpts / "step_00000004" / checkpoint.STATE_FILE).exists()
    code, log = _torchrun(_args(run_inputs, tmp_path, 8, "--save-steps", "2", "--resume", "auto"))
    assert code == 0, log
    assert f"resumed from {ckpts / 'step_00000002'} at step 2" in log, log
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    after = [r for r in rows if "loss" in r and r["step"] >= 3][-6:]
    assert [r["step"] for r in after] == [3, 4, 5, 6, 7, 8]
    assert all(r["loss"] == ref[r["step"]] for r in after)
