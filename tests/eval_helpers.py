"""Shared by the evaluation tests: a tiny exported-style HF model (transformers weights + the packer's
SentencePiece tokenizer, laid out as witscale/training/export.py writes it) and a local lm-eval task."""
from __future__ import annotations

import json
import os
import shutil

import torch

CAPITALS = {"Zorvia": "Kelmar", "Tandor": "Ospin", "Quellia": "Varrow", "Mirth": "Dunhollow", "Pellune": "Arcis"}


def make_tiny_hf(out_dir, sp_model_path, *, seed: int = 0, std: float = 0.5, layers: int = 2) -> str:
    """A random tiny Llama in an HF directory with tokenizer.model + tokenizer_config.json (as an export of a
    SentencePiece-packed run). A large init std makes its distributions peaky and prompt-dependent."""
    import transformers

    from witscale.data.tokenizer import load_tokenizer

    tok = load_tokenizer(sp_model_path)
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
                                   bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, initializer_range=std)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():            # EOS made likelier so that some greedy responses stop early
        model.lm_head.weight[tok.eos_id] *= 3.0
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    shutil.copyfile(sp_model_path, os.path.join(out_dir, "tokenizer.model"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True,
                   "add_eos_token": False}, f)
    return str(out_dir)


def capitals_task(directory) -> str:
    from witscale.evaluation.local_task import write_multiple_choice_task

    names = sorted(CAPITALS)
    docs = [{"question": f"What is the capital of {c}?",
             "choices": [f"The capital of {c} is {CAPITALS[x]}." for x in names], "answer": names.index(c)}
            for c in names]
    return write_multiple_choice_task(str(directory), "witscale_capitals", docs)


def reference_logprob(hf_model, prefix, response) -> float:
    """log P(response | prefix), one pair, the model in fp64, no packing: the independent computation."""
    ids = torch.tensor([list(prefix) + list(response)])
    with torch.no_grad():
        logp = torch.log_softmax(hf_model(ids).logits[0].double(), dim=-1)
    return float(sum(logp[len(prefix) - 1 + k, t] for k, t in enumerate(response)))
