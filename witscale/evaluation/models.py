"""The two models evaluation needs, loaded from an exported HF directory, one after the other:

* the **generator**: ``transformers``' own model for greedy decoding with a KV cache (``greedy_generate``:
  left-padded batches sorted by length; tested equal to one prompt at a time);
* the **scorer**: witscale's ``CausalLM`` (the training model, tp=1) for teacher-forced log-probabilities over
  packed rows (witscale/evaluation/scoring.py).

Device and dtype: ``auto`` is this process's GPU (``LOCAL_RANK`` under torchrun) in bf16, else the CPU in fp32.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Optional, Sequence

import torch

from witscale.model import CausalLM, ModelConfig, load_hf_weights

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return torch.device("cpu")
    return torch.device(requested)


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if requested not in DTYPES:
        raise ValueError(f"unknown dtype {requested!r} (known: auto, {', '.join(DTYPES)})")
    return DTYPES[requested]


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_scorer(model_dir: str, device: torch.device, dtype: torch.dtype, attention: str = "auto") -> CausalLM:
    """witscale's CausalLM with the HF directory's weights, built on ``device`` in ``dtype`` (eval mode)."""
    cfg = ModelConfig.from_json_file(os.path.join(model_dir, "config.json"))
    with torch.device(device), _default_dtype(dtype):
        model = CausalLM(cfg, None, attention_backend=attention)
    load_hf_weights(model, model_dir)
    return model.eval()


def load_generator(model_dir: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True,
                                                 trust_remote_code=False)
    return model.to(device).eval()


def free_memory() -> None:
    """Return the memory of models the caller has dropped (``del model`` first) before the next one loads."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.inference_mode()
def greedy_generate(model, prefixes: Sequence[Sequence[int]], stop_ids: Sequence[int], pad_id: int,
                    max_new_tokens: int, batch_size: int = 16,
                    progress: Optional[Callable[[int], None]] = None) -> list[list[int]]:
    """Greedy continuations of token-id prefixes, each cut after its first stop token (which it keeps) or
    at ``max_new_tokens``. Batches are left-padded, prefixes of similar length together."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              eos_token_id=list(stop_ids), pad_token_id=pad_id)
    order = sorted(range(len(prefixes)), key=lambda i: -len(prefixes[i]))
    out: list[list[int]] = [[] for _ in prefixes]
    stops = set(int(s) for s in stop_ids)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        width = max(len(prefixes[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            p = list(prefixes[i])
            ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        gen = gen[:, width:].tolist()
        for row, i in enumerate(idx):
            seq = gen[row][:max_new_tokens]
            cut = next((k for k, t in enumerate(seq) if t in stops), None)
            out[i] = seq[:cut + 1] if cut is not None else seq
        if progress is not None:
            progress(len(idx))
    return out
