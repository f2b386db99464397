"""--report-to wandb: rank 0 logs the resolved config (the λ values and the weight table among it) and every
metric, per-class NLL included, to Weights & Biases. Offline (WANDB_MODE=offline), a real CPU run."""
import glob
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from tests.test_train_config_file import _flags, _settings, inputs  # noqa: F401 (fixture)

wandb = pytest.importorskip("wandb")


def _log_records(path):
    """The payloads of a .wandb file: a 7-byte header (":W&B", magic, version), then LevelDB-log blocks of
    32 KiB, each record a 7-byte header (crc32c, length uint16 LE, type: 1 full, 2 first, 3 middle, 4 last)."""
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:                  # a block's tail too short for a header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind == 1:
            yield payload
        elif kind == 2:
            pending = payload
        elif kind == 3:
            pending += payload
        elif kind == 4:
            yield pending + payload


def _read_run(run_file):
    """An offline run's .wandb file: its config ({key: value}) and history rows ({key: value} per wandb.log)."""
    from wandb.proto import wandb_internal_pb2
    config, rows = {}, []
    for data in _log_records(run_file):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item})
        elif kind in ("run", "config"):
            update = rec.run.config.update if kind == "run" else rec.config.update
            config.update({item.key: json.loads(item.value_json) for item in update})
    return config, rows


@pytest.mark.slow  # trains through witscale/train.py in a subprocess
def test_offline_wandb_run_holds_the_config_and_the_metrics(inputs, tmp_path):  # noqa: F811
    settings = {**_settings(inputs), "max_steps": 3}
    out, wandb_dir = tmp_path / "run", tmp_path / "wandb"
    wandb_dir.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore", WANDB_MODE="offline",
               WANDB_DIR=str(wandb_dir), WANDB_SILENT="true")
    args = _flags(settings) + ["--output-dir", str(out), "--report-to", "wandb", "--eval-data", inputs["train"]]
    res = subprocess.run([sys.executable, "witscale/train.py", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    runs = glob.glob(str(wandb_dir / "wandb" / "offline-run-*"))
    assert len(runs) == 1, os.listdir(wandb_dir)
    config, rows = _read_run(glob.glob(os.path.join(runs[0], "*.wandb"))[0])
    assert config["args"]["prompt_weight"] == 0.3 and config["args"]["response_weight"] == 1.0     # the λ values
    assert config["weight_table"]["prompt"] == pytest.approx(0.3) and config["total_steps"] == 3
    steps = [r for r in rows if "train/loss" in r]
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["train/loss"] for r in steps] == [m["loss"] for m in metrics if "loss" in m]
    assert any("train_class_nll/response" in r for r in steps)
    evals = [r for r in rows if "eval/loss" in r]
    assert evals and any(k.startswith("eval_class_nll/") for k in evals[0])
    assert not (out / "tensorboard").exists()              # --report-to wandb alone: no TensorBoard


def test_report_to_is_checked_in_one_line(inputs, tmp_path, capsys):  # noqa: F811
    from witscale.train import main
    code = main(_flags(_settings(inputs)) + ["--output-dir", str(tmp_path), "--report-to", "tensorboard,mlflow"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["error: --report-to: unknown 'mlflow' (known: tensorboard, wandb, none)"]
