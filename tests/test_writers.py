"""Writers of a directory never delete what is not theirs (witscale/data/output_dir.py; docs/reliability.md
#writers): the HF export (hf_io.HFShardWriter, training/export.py, tools/export_hf.py, train.py --export-hf) and
the packer (format.write_packed, pack_dataset.py --overwrite) replace only an earlier output of their own kind
(its marker / manifest) or an empty directory; a file or a foreign directory is refused in one line and left
as it was; train.py refuses, before training, an --export-hf that is, contains or sits in the run's own files;
an OSError (a full tmpfs) keeps the previous output, removes the partial one and is one line naming the path
and errno; outputs get the umask's modes; a crash between renames leaves the old or the new output plus a
leftover the next run removes."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import REPO_ROOT
from tests.fs_helpers import fill_up, small_tmpfs, snapshot
from tests.test_train_cli_operations import run_inputs  # noqa: F401  (session fixture: packed data, config)
from tests.train_helpers import TINY

BIG = dict(TINY, vocab_size=2048, hidden_size=256, intermediate_size=512)    # ~10 MB in fp32: beyond a 2 MiB disk


def _export(out, config=TINY, seed=0, dtype="fp32"):
    from witscale.model import CausalLM, ModelConfig
    from witscale.training.export import write_hf_dir

    cfg = ModelConfig.from_dict(config)
    torch.manual_seed(seed)
    write_hf_dir(CausalLM(cfg).state_dict(), cfg, str(out), None, dtype=dtype)


def _corpus(lengths, seed=0):
    from witscale.data.format import TokenizedCorpus

    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n = int(offsets[-1])
    return TokenizedCorpus(rng.integers(4, 50, n).astype(np.int32), np.full(n, 2, np.uint8), None, offsets)


def _foreign(path):
    path.mkdir(parents=True)
    (path / "results.txt").write_text("a week of work")
    (path / "sub").mkdir()
    (path / "sub" / "notes.md").write_text("keep me")
    return snapshot(path)


def _hidden(directory):
    return sorted(n for n in os.listdir(directory) if n.startswith("."))


# ------------------------------------------------------------------------------------------------ export
def test_export_replaces_only_its_own_earlier_export(tmp_path):
    from witscale.data.output_dir import OutputError
    from witscale.model.hf_io import EXPORT_MARKER, SafetensorsSource

    foreign = tmp_path / "foreign"
    before = _foreign(foreign)
    with pytest.raises(OutputError, match="not a witscale HF export .*refusing to replace it") as e:
        _export(foreign)
    assert "\n" not in str(e.value) and str(e.value).startswith(str(foreign))
    assert snapshot(foreign) == before and _hidden(tmp_path) == []

    regular = tmp_path / "file"
    regular.write_text("a file")
    with pytest.raises(OutputError, match="exists and is not a directory"):
        _export(regular)
    assert regular.read_text() == "a file" and _hidden(tmp_path) == []

    ours = tmp_path / "hf"
    _export(ours, seed=0)
    assert json.loads((ours / EXPORT_MARKER).read_text())["format"] == "witscale-hf-export"
    first = SafetensorsSource(str(ours)).read("model.norm.weight").clone()
    _export(ours, config=dict(TINY, rms_norm_eps=1e-5), seed=1)            # by design: an export replaces its own
    assert json.loads((ours / "config.json").read_text())["rms_norm_eps"] == 1e-5
    assert not torch.equal(SafetensorsSource(str(ours)).read("model.embed_tokens.weight"), first)
    assert _hidden(tmp_path) == []

    empty = tmp_path / "empty"
    empty.mkdir()
    _export(empty)
    assert (empty / EXPORT_MARKER).exists()

    # a link to an earlier export: written where it points, the link kept
    link = tmp_path / "link"
    link.symlink_to(ours)
    _export(link, seed=2)
    assert link.is_symlink() and (ours / EXPORT_MARKER).exists() and _hidden(tmp_path) == []


def _plan(run_inputs, out, export):
    from tests.test_train_cli_operations import _args
    from witscale.train import build_parser, plan_run
    from witscale.training.config import RunConfig

    argv = _args(run_inputs, out, 2, "--export-hf", str(export), "--resume", "auto")
    return plan_run(RunConfig.from_args(build_parser().parse_args(argv)), 1)


@pytest.mark.parametrize("where", ["equal", "containing", "checkpoints", "inside_checkpoints", "link_to_output",
                                   "foreign", "file"])
def test_train_refuses_an_export_path_that_would_replace_the_runs_files(run_inputs, tmp_path, where):
    """Refused by plan_run: before any process group, before a step is trained."""
    from witscale.train import UsageError

    out = tmp_path / "runs" / "a"
    (out / "checkpoints" / "step_00000002").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    export = {"equal": out, "containing": tmp_path / "runs", "checkpoints": out / "checkpoints",
              "inside_checkpoints": out / "checkpoints" / "hf", "link_to_output": tmp_path / "link",
              "foreign": tmp_path / "foreign", "file": tmp_path / "model.bin"}[where]
    if where == "link_to_output":
        export.symlink_to(out)
    if where == "foreign":
        _foreign(export)
    if where == "file":
        export.write_text("x")
    before = snapshot(tmp_path)
    with pytest.raises(UsageError) as e:
        _plan(run_inputs, out, export)
    message = str(e.value)
    assert message.startswith(f"--export-hf {export}") and "\n" not in message, message
    assert snapshot(tmp_path) == before


def test_train_accepts_an_export_into_a_fresh_subdirectory_of_the_run(run_inputs, tmp_path):
    """OUT/hf (what slurm/sweep_weights.sh uses) and an earlier export there are fine."""
    out = tmp_path / "run"
    assert _plan(run_inputs, out, out / "hf").config.export_hf == str(out / "hf")
    _export(out / "hf")
    assert _plan(run_inputs, out, out / "hf")


def test_shard_writer_refuses_a_foreign_directory_before_writing(tmp_path):
    """The streaming writer (live and offline export) refuses at once, before the first tensor."""
    from witscale.data.output_dir import OutputError
    from witscale.model import ModelConfig
    from witscale.model.hf_io import HFShardWriter, model_plan

    foreign = tmp_path / "foreign"
    before = _foreign(foreign)
    cfg = ModelConfig.from_dict(TINY)
    with pytest.raises(OutputError):
        HFShardWriter(str(foreign), model_plan(cfg, torch.bfloat16), cfg.to_hf_dict())
    assert snapshot(foreign) == before and _hidden(tmp_path) == []


# ------------------------------------------------------------------------------------------------ packer
def test_pack_refuses_a_foreign_directory_and_a_file_even_with_overwrite(tmp_path):
    from witscale.data.errors import DataError
    from witscale.data.format import PackedDataset, write_packed

    corpus = _corpus([5, 7, 3])
    foreign = tmp_path / "foreign"
    before = _foreign(foreign)
    for overwrite in (False, True):
        with pytest.raises(DataError) as e:
            write_packed(str(foreign), corpus, seq_len=16, pad_id=0, overwrite=overwrite)
        assert "\n" not in str(e.value)
    assert "not a packed dataset" in str(e.value) and snapshot(foreign) == before

    regular = tmp_path / "data.bin"
    regular.write_bytes(b"precious")
    with pytest.raises(DataError, match="exists and is not a directory"):
        write_packed(str(regular), corpus, seq_len=16, pad_id=0, overwrite=True)
    assert regular.read_bytes() == b"precious"
    assert _hidden(tmp_path) == []                       # no '.data.bin...old' left behind

    ours = tmp_path / "ds"
    write_packed(str(ours), corpus, seq_len=16, pad_id=0)
    write_packed(str(ours), corpus, seq_len=8, pad_id=0, overwrite=True)
    assert PackedDataset(str(ours)).seq_len == 8 and _hidden(tmp_path) == []


def test_pack_cli_overwrite_onto_a_file_is_refused_without_a_hidden_old(tmp_path, sp_model_path):
    from tests.conftest import write_jsonl

    records = write_jsonl(tmp_path / "r.jsonl", [{"instruction": "Say hi.", "input": "", "output": "hi"}] * 3)
    target = tmp_path / "out"
    target.write_text("not a dataset")
    res = subprocess.run([sys.executable, "tools/pack_dataset.py", "--input", records, "--tokenizer", sp_model_path,
                          "--seq-len", "64", "--output", str(target), "--overwrite"], cwd=REPO_ROOT,
                         capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines()[-1] == (f"error: {target}: exists and is not a directory: refusing to "
                                                   f"replace it with a packed dataset")
    assert target.read_text() == "not a dataset" and _hidden(tmp_path) == []


# ------------------------------------------------------------------------------------------------ crashes
def test_a_crash_between_renames_leaves_a_complete_output_and_the_next_run_cleans_up(tmp_path, monkeypatch):
    """Where RENAME_EXCHANGE is missing (NFS), the old output is renamed aside first. A failure of the second
    rename puts it back at once; a crash right there (kill -9: no handler runs) leaves it complete under a
    clearly named leftover, which the next run of the packer puts back before writing; a crashed run's
    temporary directory is removed; names of any other pattern are left alone."""
    from witscale.data import output_dir
    from witscale.data.format import PACKED_KIND, PackedDataset, write_packed

    out = tmp_path / "ds"
    write_packed(str(out), _corpus([5, 7]), seq_len=16, pad_id=0)
    monkeypatch.setattr(output_dir, "_exchange", lambda a, b: False)
    real_rename = os.rename
    calls = []

    def fail_second(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError(5, "Input/output error", src)
        real_rename(src, dst)
    monkeypatch.setattr(output_dir.os, "rename", fail_second)
    with pytest.raises(output_dir.OutputError, match=r"\[Errno 5\] Input/output error"):
        write_packed(str(out), _corpus([9, 9]), seq_len=32, pad_id=0, overwrite=True)
    monkeypatch.setattr(output_dir.os, "rename", real_rename)
    assert PackedDataset(str(out)).seq_len == 16 and _hidden(tmp_path) == []

    # the state a kill -9 between the two renames leaves: the old output aside, the new one in its temp dir
    real_rename(out, tmp_path / ".ds.witscale-pack-old-dead01")
    (tmp_path / ".ds.witscale-pack-tmp-dead00").mkdir()
    (tmp_path / ".ds.witscale-pack-tmp-dead00" / "tokens.bin").write_bytes(b"\0" * 8)
    (tmp_path / ".ds.tmp-mine").mkdir()                                 # a look-alike that is not ours
    output_dir.clean_leftovers(str(out), PACKED_KIND)
    assert PackedDataset(str(out)).seq_len == 16                        # the old output back at its path
    assert _hidden(tmp_path) == [".ds.tmp-mine"]
    write_packed(str(out), _corpus([9, 9]), seq_len=32, pad_id=0, overwrite=True)
    assert PackedDataset(str(out)).seq_len == 32 and _hidden(tmp_path) == [".ds.tmp-mine"]


def test_a_live_writers_temporary_directory_is_not_cleaned(tmp_path):
    from witscale.data.format import PACKED_KIND
    from witscale.data.output_dir import DirectoryWriter, clean_leftovers

    writer = DirectoryWriter(str(tmp_path / "ds"), PACKED_KIND)
    assert clean_leftovers(str(tmp_path / "ds"), PACKED_KIND) == [] and os.path.isdir(writer.tmp)
    writer.abort()
    assert _hidden(tmp_path) == []


# ------------------------------------------------------------------------------------------------ full disk
def test_full_disk_under_export_keeps_the_previous_export(tmp_path):
    from witscale.data.output_dir import OutputError

    with small_tmpfs(tmp_path / "disk", "2m") as disk:
        out = os.path.join(disk, "hf")
        _export(out)
        before = snapshot(out)
        with pytest.raises(OutputError) as e:
            _export(out, config=BIG)
        message = str(e.value)
        assert message.startswith(f"{out}: [Errno 28] No space left on device") and "\n" not in message, message
        assert snapshot(out) == before and os.listdir(disk) == ["hf"]


def test_full_disk_under_pack_cli_keeps_the_previous_dataset_and_says_one_line(tmp_path, sp_model_path):
    from tests.conftest import write_jsonl

    records = write_jsonl(tmp_path / "r.jsonl", [{"instruction": f"Say hi {i}.", "input": "", "output": "hi"}
                                                 for i in range(8)])
    with small_tmpfs(tmp_path / "disk", "2m") as disk:
        out = os.path.join(disk, "ds")

        def pack(seq_len, *extra):
            return subprocess.run([sys.executable, "tools/pack_dataset.py", "--input", records, "--tokenizer",
                                   sp_model_path, "--seq-len", str(seq_len), "--output", out, *extra],
                                  cwd=REPO_ROOT, capture_output=True, text=True,
                                  env=dict(os.environ, PYTHONWARNINGS="ignore"))
        assert pack(64).returncode == 0
        before = snapshot(out)
        res = pack(800_000, "--overwrite")         # one row of 800k tokens: 3.2 MB of tokens.bin
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: {out}: [Errno 28] No space left on device (writing "), last
        assert snapshot(out) == before and os.listdir(disk) == ["ds"]


def test_full_disk_under_the_reference_writer_keeps_the_dataset(tmp_path, sp_model_path):
    from witscale.data.format import PackedDataset, write_reference_logps
    from witscale.data.output_dir import OutputError
    from witscale.data.synthetic import make_preference_dataset

    with small_tmpfs(tmp_path / "disk", "2m") as disk:
        data = os.path.join(disk, "pref")
        manifest = make_preference_dataset(data, sp_model_path, n=8, seq_len=128)
        before = snapshot(data)
        fill_up(disk)
        with pytest.raises(OutputError) as e:
            write_reference_logps(data, np.full(manifest["num_documents"], -1.0), {"model": "m"})
        assert str(e.value).startswith(f"{data}/reference_logps.bin: [Errno 28] No space left on device")
        after = snapshot(data)
        after.pop(".reference.lock", None)
        assert after == before and PackedDataset(data).reference_logps is None


# ------------------------------------------------------------------------------------------------ modes
@pytest.mark.parametrize("mask,dir_mode,file_mode", [(0o022, 0o755, 0o644), (0o002, 0o775, 0o664)])
def test_outputs_follow_the_umask(tmp_path, sp_model_path, mask, dir_mode, file_mode):
    from witscale.data.format import REFERENCE_FILE, write_packed, write_reference_logps
    from witscale.data.synthetic import make_preference_dataset

    old = os.umask(mask)
    try:
        _export(tmp_path / "hf")
        write_packed(str(tmp_path / "ds"), _corpus([5, 6]), seq_len=16, pad_id=0)
        pref = str(tmp_path / "pref")
        manifest = make_preference_dataset(pref, sp_model_path, n=4, seq_len=128)
        write_reference_logps(pref, np.full(manifest["num_documents"], -1.0), {"model": "m"})
    finally:
        os.umask(old)
    for d in ("hf", "ds", "pref"):
        assert stat.S_IMODE(os.stat(tmp_path / d).st_mode) == dir_mode, d
    for f in ("hf/model.safetensors", "hf/config.json", "ds/tokens.bin", "ds/manifest.json",
              f"pref/{REFERENCE_FILE}", "pref/manifest.json"):
        assert stat.S_IMODE(os.stat(tmp_path / f).st_mode) == file_mode, f


@pytest.mark.slow  # trains through witscale/train.py in a subprocess
def test_full_disk_under_train_export_keeps_the_previous_export_and_the_checkpoint(run_inputs, tmp_path):
    """train.py --export-hf onto a full disk: exit 2 with one line naming the export and the errno; the
    earlier export there and the run's final checkpoint are intact."""
    from tests.test_train_cli_operations import _args, _env

    with small_tmpfs(tmp_path / "disk", "2m") as disk:
        export = os.path.join(disk, "hf")
        _export(export, config=json.load(open(run_inputs["config"])))
        before = snapshot(export)
        fill_up(disk, leave=4096)
        res = subprocess.run([sys.executable, "witscale/train.py",
                              *_args(run_inputs, tmp_path / "run", 2, "--export-hf", export, "--no-tensorboard")],
                             cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=600)
        assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: {export}: [Errno 28] No space left on device"), res.stderr[-2000:]
        assert "Traceback" not in res.stderr
        assert snapshot(export) == before and sorted(os.listdir(disk)) == ["filler.bin", "hf"]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_00000002"


@pytest.mark.slow  # trains through witscale/train.py in a subprocess (the DPO reference pass)
def test_full_disk_under_the_reference_pass_exits_with_one_line(run_inputs, tmp_path, sp_model_path):
    """tools/precompute_reference.py into a dataset on a full disk: exit 2, one line naming the file and the
    errno; the dataset as it was, no temp file left."""
    from tests.test_train_cli_operations import _env
    from witscale.data.synthetic import make_preference_dataset

    model = tmp_path / "ref"
    _export(model, config=json.load(open(run_inputs["config"])))
    with small_tmpfs(tmp_path / "disk", "2m") as disk:
        data = os.path.join(disk, "pref")
        make_preference_dataset(data, sp_model_path, n=8, seq_len=128)
        before = snapshot(data)
        fill_up(disk)
        res = subprocess.run([sys.executable, "tools/precompute_reference.py", "--data", data, "--model", str(model)],
                             cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=600)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stdout[-2000:] + res.stderr[-2000:]
        assert res.stderr.strip().splitlines()[-1].startswith(
            f"error: {data}/reference_logps.bin: [Errno 28] No space left on device"), res.stderr[-2000:]
        after = snapshot(data)
        after.pop(".reference.lock", None)
        assert after == before


@pytest.mark.parametrize("where", ["run", "checkpoints", "inside_checkpoints", "parent"])
def test_export_cli_refuses_the_run_it_reads_from(tmp_path, where):
    """tools/export_hf.py CKPT OUT with OUT the run directory, its checkpoints (or inside them) or a directory
    containing the run: one line, exit 2, nothing touched."""
    run = tmp_path / "runs" / "a"
    (run / "checkpoints" / "step_00000001").mkdir(parents=True)
    (run / "checkpoints" / "step_00000001" / "witscale_state.json").write_text("{}")
    (run / "checkpoints" / "latest").write_text("step_00000001")
    (run / "model_config.json").write_text(json.dumps(TINY))
    out = {"run": run, "checkpoints": run / "checkpoints", "inside_checkpoints": run / "checkpoints" / "hf",
           "parent": tmp_path / "runs"}[where]
    before = snapshot(tmp_path)
    res = subprocess.run([sys.executable, "tools/export_hf.py", str(run / "checkpoints"), str(out)], cwd=REPO_ROOT,
                         capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines()[-1] == (f"error: {out}: would replace the run {run} or its checkpoints: "
                                                   f"choose another directory"), res.stderr
    assert snapshot(tmp_path) == before


def test_demo_refuses_a_foreign_out_directory(tmp_path):
    """tools/demo.py --out deleted whatever directory it was given; now only an earlier demo's."""
    foreign = tmp_path / "runs"
    before = _foreign(foreign)
    res = subprocess.run([sys.executable, "tools/demo.py", "--out", str(foreign)], cwd=REPO_ROOT, capture_output=True,
                         text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"), timeout=120)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith(
        f"error: --out {foreign}: a non-empty directory that is not a witscale demo directory"), res.stderr
    assert snapshot(foreign) == before


@pytest.mark.slow  # trains through witscale/train.py in a subprocess
def test_full_disk_under_a_checkpoint_save_keeps_the_previous_checkpoint_and_says_one_line(run_inputs, tmp_path):
    """A checkpoint save onto a full disk: exit 2 with one line naming the file and the errno (no traceback);
    `latest` still names the previous checkpoint, whose files are intact, and it resumes."""
    from tests.test_train_cli_operations import _args, _env

    def train(out, steps, *extra):
        return subprocess.run([sys.executable, "witscale/train.py",
                               *_args(run_inputs, out, steps, "--save-steps", "2", "--no-tensorboard", *extra)],
                              cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=600)

    with small_tmpfs(tmp_path / "disk", "32m") as disk:
        out = os.path.join(disk, "run")
        res = train(out, 2)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        ckpts = os.path.join(out, "checkpoints")
        before = snapshot(os.path.join(ckpts, "step_00000002"))
        fill_up(disk, leave=64 * 1024)          # room for the lock and a few metrics lines, not a checkpoint
        res = train(out, 4, "--resume", "auto", "--reschedule")
        assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: {ckpts}/step_00000004") and "[Errno 28] No space left on device" in last, \
            res.stderr[-2000:]
        assert "Traceback" not in res.stderr
        assert open(os.path.join(ckpts, "latest")).read().strip() == "step_00000002"
        assert snapshot(os.path.join(ckpts, "step_00000002")) == before
        os.unlink(os.path.join(disk, "filler.bin"))
        res = train(out, 4, "--resume", "auto", "--reschedule")     # the partial step-4 directory is no obstacle
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        assert open(os.path.join(ckpts, "latest")).read().strip() == "step_00000004"
