"""Export a trained model as an HF directory that ``transformers.AutoModelForCausalLM`` loads.

Two entry points:
- ``export_from_engine``: at the end of training (``--export-hf``), from the live engine; collective.
- ``export_checkpoint``: offline, from a witscale checkpoint directory (``tools/export_hf.py``).
Both write safetensors shards + config.json (+ the tokenizer files, when given) into a temporary directory
renamed into place, so a failed export never leaves something that looks like a model.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import shutil
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger("witscale")

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "generation_config.json")


def copy_tokenizer_files(src: Optional[str], out_dir: str) -> list[str]:
    """Copy tokenizer files from a directory (or a single SentencePiece .model file) into out_dir."""
    if not src:
        return []
    copied = []
    if os.path.isfile(src):
        name = "tokenizer.model" if src.endswith(".model") else os.path.basename(src)
        shutil.copyfile(src, os.path.join(out_dir, name))
        copied.append(name)
        if name == "tokenizer.model":
            # A bare SentencePiece model: tell transformers which class reads it.
            with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
                json.dump({"tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True,
                           "add_eos_token": False}, f, indent=1)
            copied.append("tokenizer_config.json")
        return copied
    for name in TOKENIZER_FILES:
        path = os.path.join(src, name)
        if os.path.exists(path):
            shutil.copyfile(path, os.path.join(out_dir, name))
            copied.append(name)
    return copied


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DeepSpeed's consolidation may prefix names with "module."; the model itself uses HF's names.
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def write_hf_dir(state: dict[str, torch.Tensor], model_config, out_dir: str, tokenizer_src: Optional[str],
                 dtype: torch.dtype = torch.float32) -> None:
    from witscale.model.hf_io import save_hf_checkpoint

    state = {k: v.to(dtype).contiguous() for k, v in _strip_prefix(state).items()}
    if getattr(model_config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_hf_checkpoint(state, model_config, out_dir)
    copied = copy_tokenizer_files(tokenizer_src, out_dir)
    log.info(f"exported HF model to {out_dir} ({len(state)} tensors; tokenizer files: {', '.join(copied) or 'none'})")


def export_from_engine(trainer, model_config, out_dir: str, tokenizer_src: Optional[str] = None) -> None:
    """Collective: every rank gathers its parameters; rank 0 writes the directory."""
    state = trainer.full_dense_state_dict()
    if dist.get_rank() == 0:
        write_hf_dir(state, model_config, out_dir, tokenizer_src)
    dist.barrier()


def export_checkpoint(checkpoint_path: str, out_dir: str, tokenizer_src: Optional[str] = None) -> None:
    """Offline: consolidate a witscale checkpoint (any ZeRO stage) into an HF directory."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from witscale.training.checkpoint import resolve_resume
    from witscale.model import ModelConfig

    root, tag = resolve_resume(checkpoint_path, checkpoint_path)
    run_dir = os.path.dirname(os.path.abspath(root))
    config_path = os.path.join(run_dir, "model_config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path}: the run's model config is missing (written at start of training)")
    model_config = ModelConfig.from_json_file(config_path)
    if glob.glob(os.path.join(root, tag, "*mp_rank_01*")):
        raise ValueError(f"{os.path.join(root, tag)} is tensor/pipeline-parallel: offline export supports tp=pp=1; "
                         "use --export-hf at the end of training (it gathers the shards from the live run)")
    if glob.glob(os.path.join(root, tag, "*zero_pp_rank_*optim_states.pt")):
        # ZeRO 1-3: the fp32 master weights live partitioned in the optimizer states.
        state = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
    else:
        files = sorted(glob.glob(os.path.join(root, tag, "mp_rank_*_model_states.pt")))
        if not files:
            raise FileNotFoundError(f"{os.path.join(root, tag)}: no DeepSpeed model states")
        # Our own run's file; DeepSpeed stores non-tensor metadata in it, which weights_only rejects.
        state = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    write_hf_dir(state, model_config, out_dir, tokenizer_src)
