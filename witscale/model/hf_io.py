"""HF safetensors in and out.

Reading: ``SafetensorsSource`` indexes a checkpoint directory (one file, or shards listed in
``model.safetensors.index.json``) and reads tensors through memory-mapped ``safe_open``; ``read_shard``
reads only the slice a tensor-parallel rank needs (``get_slice``), so no rank ever holds the full model.
No pickle is ever loaded: ``*.bin`` checkpoints are refused (convert them to safetensors first).

Writing: ``save_hf_checkpoint`` writes safetensors shards, their index and config.json into a temporary
directory and renames it into place, so an interrupted export never looks complete.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)   # old checkpoints store RoPE buffers; we recompute them


class CheckpointFormatError(ValueError):
    pass


class SafetensorsSource:
    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, INDEX)
        if os.path.exists(index):
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            weight_map = None
        if not files:
            hint = " (only pickle *.bin weights found: convert them to safetensors)" if any(
                f.endswith(".bin") for f in os.listdir(path)) else ""
            raise CheckpointFormatError(f"{path}: no *.safetensors weights{hint}")
        self._files = {}
        self._where: dict[str, str] = {}
        for fname in files:
            full = os.path.join(path, fname)
            if not os.path.exists(full):
                raise CheckpointFormatError(f"{index}: lists {fname}, which is missing")
            handle = safe_open(full, framework="pt")
            self._files[fname] = handle
            for name in handle.keys():
                if weight_map is None or weight_map.get(name) == fname:
                    self._where[name] = fname

    def names(self) -> list[str]:
        return [n for n in self._where if not n.endswith(IGNORED_SUFFIXES)]

    def has(self, name: str) -> bool:
        return name in self._where

    def _slice(self, name: str):
        if name not in self._where:
            raise CheckpointFormatError(f"{self.path}: tensor {name} is missing")
        return self._files[self._where[name]].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def read(self, name: str) -> torch.Tensor:
        return self._slice(name)[:]

    def read_shard(self, name: str, dim: Optional[int], rank: int, tp: int,
                   padded_rows: Optional[int] = None) -> torch.Tensor:
        """Rank ``rank``'s 1/tp piece along ``dim``; vocabulary rows beyond the file's are zero padding."""
        sl = self._slice(name)
        shape = list(sl.get_shape())
        if dim is None or tp == 1 and not (padded_rows and padded_rows > shape[0]):
            return sl[:]
        total = padded_rows if (dim == 0 and padded_rows) else shape[dim]
        if total % tp:
            raise CheckpointFormatError(f"{self.path}: {name} dimension {dim} ({total}) is not divisible by tp {tp}")
        per = total // tp
        start, end = rank * per, (rank + 1) * per
        stop = min(end, shape[dim])
        part = (sl[start:stop] if dim == 0 else sl[:, start:stop]) if start < stop else None
        if part is not None and stop == end:
            return part
        # The shard reaches into vocabulary padding: fill the missing rows with zeros.
        out_shape = list(shape)
        out_shape[dim] = per
        out = torch.zeros(out_shape, dtype=part.dtype if part is not None else torch.float32)
        if part is not None:
            out.narrow(dim, 0, stop - start).copy_(part)
        return out


def save_hf_checkpoint(state_dict: dict[str, torch.Tensor], config, out_dir: str,
                       max_shard_bytes: int = 5 * 1024 ** 3) -> None:
    """Write an HF model directory (safetensors shards + index + config.json) atomically."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name in sorted(state_dict):
            t = state_dict[name].detach().cpu().contiguous()
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = t
            size += nbytes
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(tmp, fname), metadata={"format": "pt"})
            weight_map.update({name: fname for name in shard})
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in state_dict.values())
            with open(os.path.join(tmp, INDEX), "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
        cfg = config.to_hf_dict() if hasattr(config, "to_hf_dict") else dict(config)
        dtype = next(iter(state_dict.values())).dtype
        cfg["torch_dtype"] = str(dtype).replace("torch.", "")
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
