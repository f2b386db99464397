"""Shared by tests/test_slurm.py and tests/test_mpi.py: the tiny CPU run the Slurm templates launch, and
the skip-or-fail rule (WITSCALE_REQUIRE_SLURM=1, set by CI, turns every "cannot run here" into a failure)."""
from __future__ import annotations

import json
import os
import sys

import pytest

from tests.conftest import REPO_ROOT

SEQ = 64
REQUIRED = os.environ.get("WITSCALE_REQUIRE_SLURM") == "1"


def unavailable(reason: str):
    if REQUIRED:
        pytest.fail(f"{reason} (WITSCALE_REQUIRE_SLURM=1)")
    pytest.skip(reason)


def make_tiny_inputs(root, sp_model_path) -> dict:
    """Packed train/eval sets of 64-token rows and a 2-layer, 32-wide Llama config matching the tokenizer."""
    from witscale.data.pack import PackOptions, pack_records
    from witscale.data.synthetic import generate_instruction_records
    from witscale.data.tokenizer import load_tokenizer

    records = generate_instruction_records(200, seed=1)
    pack_records(records[:180], sp_model_path, str(root / "train"), PackOptions(seq_len=SEQ, template="plain"))
    pack_records(records[180:], sp_model_path, str(root / "eval"), PackOptions(seq_len=SEQ, template="plain"))
    tok = load_tokenizer(sp_model_path)
    config = {"model_type": "llama", "vocab_size": tok.vocab_size, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
              "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}
    (root / "model.json").write_text(json.dumps(config))
    return {"train": str(root / "train"), "eval": str(root / "eval"), "config": str(root / "model.json")}


def cpu_env(**extra) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def train_flags(inputs: dict, out, steps: int, *extra) -> list[str]:
    return ["--ds_config", "ds_configs/zero3.json", "--data", inputs["train"], "--model-config", inputs["config"],
            "--output-dir", str(out), "--prompt-weight", "0.3", "--micro-batch-size", "2", "--grad-accum", "2",
            "--lr", "3e-3", "--max-steps", str(steps), "--seed", "7", "--no-tensorboard", *extra]


def read_metrics(out_dir) -> list[dict]:
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    return rows


def train_losses(out_dir) -> dict:
    return {r["step"]: r["loss"] for r in read_metrics(out_dir) if "loss" in r and "eval_loss" not in r}


def world_of(out_dir) -> int:
    with open(os.path.join(out_dir, "effective_config.json"), encoding="utf-8") as f:
        return json.load(f)["layout"]["world"]


PY = sys.executable
TRAIN = os.path.join(REPO_ROOT, "witscale", "train.py")
