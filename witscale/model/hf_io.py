"""HF safetensors in and out.

Reading: ``SafetensorsSource`` indexes a checkpoint directory (one file, or shards listed in
``model.safetensors.index.json``) and reads tensors through memory-mapped ``safe_open``; ``read_shard``
reads only the slice a tensor-parallel rank needs (``get_slice``), so no rank ever holds the full model.
No pickle is ever loaded: ``*.bin`` checkpoints are refused (convert them to safetensors first).

``slice_fn(name, slice)`` picks what this rank needs from a lazy safetensors slice; ``tp_slice_fn`` is the
one for witscale's tensor-parallel layers. Filling a model from a checkpoint: witscale/model/weights.py.

Writing: ``save_hf_checkpoint`` writes safetensors shards, their index and config.json into a temporary
directory and renames it into place, so an interrupted export never looks complete.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Callable, Optional

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
        if not os.path.isdir(path):
            raise CheckpointFormatError(f"{path}: not a directory")
        index = os.path.join(path, INDEX)
        if os.path.exists(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointFormatError(f"{index}: not a safetensors index ({e})") from None
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
            try:
                handle = safe_open(full, framework="pt")
            except Exception as e:     # safetensors raises its own error types for corrupt headers
                raise CheckpointFormatError(f"{full}: unreadable safetensors file ({e})") from None
            self._files[fname] = handle
            for name in handle.keys():
                if weight_map is None or weight_map.get(name) == fname:
                    self._where[name] = fname
        if weight_map is not None:
            lost = sorted(n for n, f in weight_map.items() if self._where.get(n) != f)
            if lost:
                raise CheckpointFormatError(f"{index}: lists {lost[0]} in {weight_map[lost[0]]}, which does not hold it"
                                            + (f" (and {len(lost) - 1} more)" if len(lost) > 1 else ""))

    def names(self) -> list[str]:
        return [n for n in self._where if not n.endswith(IGNORED_SUFFIXES)]

    def has(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> str:
        return os.path.join(self.path, self._where[name]) if name in self._where else self.path

    def slice(self, name: str):
        """The lazy safetensors slice of ``name`` (``get_shape()``, ``[a:b]``, ``[:, a:b]``)."""
        if name not in self._where:
            raise CheckpointFormatError(f"{self.path}: tensor {name} is missing")
        return self._files[self._where[name]].get_slice(name)

    _slice = slice

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.slice(name).get_shape())

    def read(self, name: str) -> torch.Tensor:
        return self.slice(name)[:]

    def read_shard(self, name: str, dim: Optional[int], rank: int, tp: int,
                   padded_rows: Optional[int] = None) -> torch.Tensor:
        try:
            return shard_of_slice(self.slice(name), dim, rank, tp, padded_rows)
        except ValueError as e:
            raise CheckpointFormatError(f"{self.file_of(name)}: {name}: {e}") from None


def shard_of_slice(sl, dim: Optional[int], rank: int, tp: int, padded_rows: Optional[int] = None) -> torch.Tensor:
    """Rank ``rank``'s 1/tp piece of a lazy slice along ``dim`` (None: replicated, the whole tensor);
    vocabulary rows beyond the file's (``padded_rows`` > rows) are zero padding. Reads only that piece."""
    shape = list(sl.get_shape())
    if dim is None or tp == 1 and not (padded_rows and padded_rows > shape[0]):
        return sl[:]
    total = padded_rows if (dim == 0 and padded_rows) else shape[dim]
    if total % tp:
        raise ValueError(f"dimension {dim} ({total}) is not divisible by tp {tp}")
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


SliceFn = Callable[[str, object], torch.Tensor]


def whole_tensor(name: str, sl) -> torch.Tensor:
    return sl[:]


def tp_slice_fn(model: torch.nn.Module, tp_rank: int, tp: int) -> SliceFn:
    """The slice_fn for witscale's TP layers: each parameter says how it is cut (``tp_split_dim``) and
    how far the vocabulary is padded (``padded_dense_rows``)."""
    params = dict(model.named_parameters())

    def fn(name: str, sl) -> torch.Tensor:
        p = params[name]
        return shard_of_slice(sl, getattr(p, "tp_split_dim", None), tp_rank, tp, getattr(p, "padded_dense_rows", None))
    return fn


_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
          "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}


def parse_size(size) -> int:
    """Bytes from an int or a string like '5GB' (decimal units, as transformers) or '500MiB'."""
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
        if not m or m.group(2).upper() not in _UNITS:
            raise ValueError(f"max_shard_size {size!r}: expected bytes or a size like '5GB'")
        n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return n


def _check_state_dict(state_dict: dict, config) -> dict[str, torch.Tensor]:
    """The state dict to write: the tied LM head dropped, every name and shape checked against the config
    (a tensor-parallel shard passed by mistake must not become an HF checkpoint)."""
    from witscale.model.transformer import dense_shapes

    state = dict(state_dict)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    want = dense_shapes(config)
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or unexpected:
        raise ValueError("state dict does not match the config: "
                         + (f"missing {', '.join(missing[:4])}{'…' if len(missing) > 4 else ''}; " if missing else "")
                         + (f"unexpected {', '.join(unexpected[:4])}{'…' if len(unexpected) > 4 else ''}"
                            if unexpected else ""))
    for name, shape in want.items():
        if tuple(state[name].shape) != tuple(shape):
            raise ValueError(f"state dict tensor {name} has shape {tuple(state[name].shape)}, the config implies "
                             f"{tuple(shape)} (a tensor-parallel shard, or padded vocabulary rows?)")
    return state


def save_hf_checkpoint(state_dict: dict[str, torch.Tensor], config, out_dir: str, max_shard_size="5GB", *,
                       max_shard_bytes: Optional[int] = None) -> None:
    """Write an HF model directory (safetensors shards + index + config.json) atomically: everything goes
    to a temporary sibling directory that is renamed into place; an existing ``out_dir`` is replaced only
    once the new one is complete. ``config`` is a ModelConfig (checked against the state dict) or a dict."""
    limit = max_shard_bytes if max_shard_bytes is not None else parse_size(max_shard_size)
    if hasattr(config, "to_hf_dict"):
        state = _check_state_dict(state_dict, config)
        cfg = config.to_hf_dict()
    else:
        state, cfg = dict(state_dict), dict(config)
    if not state:
        raise ValueError("save_hf_checkpoint: empty state dict")
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size, storages = 0, set()
        for name in sorted(state):
            t = state[name].detach().cpu().contiguous()
            nbytes = t.numel() * t.element_size()
            # safetensors refuses tensors that share storage (views, tied copies): give those their own.
            ptr = t.untyped_storage().data_ptr()
            if ptr in storages or t.untyped_storage().nbytes() != nbytes:
                t = t.clone()
            storages.add(t.untyped_storage().data_ptr())
            if shards[-1] and size + nbytes > limit:
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
            total = sum(t.numel() * t.element_size() for t in state.values())
            with open(os.path.join(tmp, INDEX), "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
        dtype = str(next(iter(state.values())).dtype).replace("torch.", "")
        cfg["torch_dtype"] = dtype
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)
        old = None
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rmdir(old)
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
