"""Resumable checkpoints: DeepSpeed's engine state plus witscale's client state, committed atomically.

Layout under ``<output-dir>/checkpoints``:

    step_00000100/            one DeepSpeed checkpoint (tag), model/optimizer shards of every rank
        rng_rank00003.pt      torch RNG state of each rank (DeepSpeed saves client state from one rank only)
        witscale_state.json   step, loader position, fingerprints — written LAST, after every rank finished
    latest                    the tag of the newest *complete* checkpoint (replaced atomically)

A crash in the middle of a save leaves a tag directory without ``witscale_state.json`` and ``latest``
still naming the previous checkpoint, which stays loadable. Only the last ``keep`` complete checkpoints
are kept.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from typing import Optional

import torch
import torch.distributed as dist

from witscale.training.faults import injected

log = logging.getLogger("witscale")

STATE_FILE = "witscale_state.json"
LATEST = "latest"


class CheckpointError(RuntimeError):
    pass


def data_fingerprint(manifest: dict) -> str:
    """What must not change under a resumed run: the tokenizer, the rows and the sources."""
    keys = {k: manifest.get(k) for k in ("tokenizer", "seq_len", "num_rows", "num_tokens", "template")}
    keys["sources"] = [s.get("sha256") for s in manifest.get("sources", [])]
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_fingerprint(model_config) -> str:
    d = model_config.to_hf_dict() if hasattr(model_config, "to_hf_dict") else vars(model_config)
    keep = {k: d.get(k) for k in ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                                  "num_hidden_layers", "num_attention_heads", "num_key_value_heads")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_latest(root: str) -> Optional[str]:
    """The tag `latest` names, if it names a complete checkpoint; None when there is none yet."""
    path = os.path.join(root, LATEST)
    if not os.path.exists(path):
        return None
    tag = open(path, encoding="utf-8").read().strip()
    if not os.path.exists(os.path.join(root, tag, STATE_FILE)):
        raise CheckpointError(f"{path} names {tag}, which is incomplete (no {STATE_FILE})")
    return tag


def complete_tags(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    return sorted(t for t in os.listdir(root) if t.startswith("step_")
                  and os.path.exists(os.path.join(root, t, STATE_FILE)))


def save(engine, root: str, step: int, client_state: dict, keep: int) -> str:
    """Collective: every rank calls it. Returns the tag written."""
    tag = tag_for(step)
    rank = dist.get_rank()
    engine.save_checkpoint(root, tag=tag, save_latest=False)
    torch.save(_rng_state(), os.path.join(root, tag, f"rng_rank{rank:05d}.pt"))
    dist.barrier()                      # every rank's shards are on disk before the commit
    if injected("crash_in_save", step):   # die where a real crash would hurt most: shards written, no commit
        os._exit(17)
    if rank == 0:
        _atomic_write(os.path.join(root, tag, STATE_FILE), json.dumps(client_state, indent=1))
        _atomic_write(os.path.join(root, LATEST), tag)
        for old in complete_tags(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
        log.info(f"checkpoint {tag} saved")
    dist.barrier()
    if injected("kill_after_save", step):
        os.kill(os.getpid(), 9)
    return tag


def resolve_resume(resume: str, root: str) -> Optional[tuple[str, str]]:
    """(root, tag) to load for --resume auto|PATH, or None to start fresh."""
    if resume == "auto":
        tag = read_latest(root)
        return (root, tag) if tag else None
    path = os.path.abspath(resume)
    if os.path.exists(os.path.join(path, STATE_FILE)):
        return os.path.dirname(path), os.path.basename(path)
    if os.path.exists(os.path.join(path, LATEST)):
        tag = read_latest(path)
        if tag:
            return path, tag
    raise CheckpointError(f"--resume {resume}: not a complete witscale checkpoint (no {STATE_FILE}) "
                          f"nor a checkpoints directory with a '{LATEST}' file")


def load(engine, root: str, tag: str) -> dict:
    """Collective: restore the engine (model, optimizer, schedule) and this rank's RNG; return client state."""
    with open(os.path.join(root, tag, STATE_FILE), encoding="utf-8") as f:
        client_state = json.load(f)
    path, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {os.path.join(root, tag)}")
    rng_file = os.path.join(root, tag, f"rng_rank{dist.get_rank():05d}.pt")
    if os.path.exists(rng_file):
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return client_state


def check_fingerprints(client_state: dict, *, data_fp: str, model_fp: str, allow_data_change: bool,
                       where: str) -> None:
    if client_state.get("model_fingerprint") != model_fp:
        raise CheckpointError(f"{where} was trained with a different model configuration "
                              f"({client_state.get('model_fingerprint')} ≠ {model_fp})")
    if client_state.get("data_fingerprint") != data_fp and not allow_data_change:
        raise CheckpointError(f"{where} was trained on different data ({client_state.get('data_fingerprint')} "
                              f"≠ {data_fp}); pass --allow-data-change to continue on new data")


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
