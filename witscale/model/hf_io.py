"""HF safetensors in and out.

Reading: ``SafetensorsSource`` indexes a checkpoint directory (one file, or shards listed in
``model.safetensors.index.json``) and reads tensors through memory-mapped ``safe_open``; ``read_shard``
reads only the slice a tensor-parallel rank needs (``get_slice``), so no rank ever holds the full model.
No pickle is ever loaded: ``*.bin`` checkpoints are refused (convert them to safetensors first).
A checkpoint whose tensors are not stored under HF's text-model names (the language model inside a multimodal
Gemma-3) is read through ``rename`` (witscale/model/hf_names.py ``checkpoint_to_hf_name``): every method then
takes and gives the HF names, and the tensors of the other parts (vision tower, projector) are left unread.

``slice_fn(name, slice)`` picks what this rank needs from a lazy safetensors slice; ``tp_slice_fn`` is the
one for witscale's tensor-parallel layers. Filling a model from a checkpoint: witscale/model/weights.py.

Writing: ``HFShardWriter`` streams an HF directory tensor by tensor (shards planned from the config, each
tensor's bytes written straight to its place in its shard: nothing but the tensor at hand is held in
memory) into a temporary directory swapped into place (witscale/data/output_dir.py), so an interrupted export
never looks complete; it replaces only an earlier witscale export (its ``witscale_export.json`` marker) or an
empty directory — anything else at the path is refused, never deleted — and an OSError (a full disk) becomes
one line naming the path (``OutputError``). ``save_hf_checkpoint`` writes an in-memory state dict through it.
"""
from __future__ import annotations

import json
import os
import re
from typing import Callable, Optional

import torch
from safetensors import safe_open

from witscale.data.output_dir import DirectoryWriter, OutputError, OutputKind

INDEX = "model.safetensors.index.json"
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)   # old checkpoints store RoPE buffers; we recompute them
EXPORT_MARKER = "witscale_export.json"      # says a directory is a witscale export (and may be replaced by one)
EXPORT_FORMAT = "witscale-hf-export"


def is_export_dir(path: str) -> bool:
    """Was ``path`` written by witscale's HF writer (its witscale_export.json)?"""
    try:
        with open(os.path.join(path, EXPORT_MARKER), encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format") == EXPORT_FORMAT


EXPORT_KIND = OutputKind("witscale HF export", "witscale-export", EXPORT_MARKER, is_export_dir)


class CheckpointFormatError(ValueError):
    pass


class SafetensorsSource:
    def __init__(self, path: str, rename: Optional[Callable[[str], Optional[str]]] = None):
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
        self._stored: dict[str, str] = {n: n for n in self._where}     # HF name → name in the file
        if rename is not None:
            where, stored = {}, {}
            for name, fname in self._where.items():
                hf = rename(name)
                if hf is None:
                    continue                    # another part of the checkpoint (e.g. a vision tower)
                if hf in stored:
                    raise CheckpointFormatError(f"{path}: tensors {stored[hf]} and {name} are both {hf}")
                where[hf], stored[hf] = fname, name
            self._where, self._stored = where, stored

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
        return self._files[self._where[name]].get_slice(self._stored[name])

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
    """The slice_fn for witscale's TP layers: each parameter says how it is cut (``tp_split_dim``; None:
    replicated and read whole — norms, row-parallel biases, and k/v when the model has fewer KV heads than
    tp, parallel/layers.py ``ReplicatedKVHeadLinear``) and how far the vocabulary is padded
    (``padded_dense_rows``)."""
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


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}
EXPORT_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def export_dtype(name) -> torch.dtype:
    """``'bf16'`` / ``'fp32'`` (or a torch dtype) → the torch dtype an export writes."""
    if isinstance(name, torch.dtype):
        if name not in EXPORT_DTYPES.values():
            raise ValueError(f"export dtype {name}: expected bf16 or fp32")
        return name
    if name not in EXPORT_DTYPES:
        raise ValueError(f"export dtype {name!r}: expected one of {', '.join(EXPORT_DTYPES)}")
    return EXPORT_DTYPES[name]


def _nbytes(shape, dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()


class HFShardWriter:
    """Streams an HF model directory to disk one tensor at a time.

    Every tensor's name, shape and dtype is known before the first byte is written (from the config:
    ``dense_shapes``), so the shards are planned up front — tensors in the given order, a new shard when
    the next tensor would take the current one past ``max_shard_size`` — and each shard file is created
    with its final safetensors header. ``write(name, tensor)`` then copies the tensor's bytes straight to
    their place in the file: nothing but the tensor being written is ever held in memory (no shard buffer,
    no pickle). ``commit()`` checks that every planned tensor was written, adds the index, config.json and
    the witscale_export.json marker and swaps the temporary directory into place (an existing ``out_dir``,
    which must be an earlier export or empty, is replaced only then);
    ``abort()`` (or leaving a ``with`` block by an exception) removes everything.
    """

    def __init__(self, out_dir: str, plan: list[tuple[str, tuple[int, ...], torch.dtype]], config: dict,
                 max_shard_size="5GB", *, max_shard_bytes: Optional[int] = None):
        if not plan:
            raise ValueError("HFShardWriter: nothing to write")
        limit = max_shard_bytes if max_shard_bytes is not None else parse_size(max_shard_size)
        self.out_dir = os.path.abspath(out_dir)
        self.config = dict(config)
        dtypes = {dt for _, _, dt in plan}
        self.config["torch_dtype"] = str(plan[0][2]).replace("torch.", "") if len(dtypes) == 1 else "float32"
        groups: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for name, shape, dtype in plan:
            if dtype not in _ST_DTYPES:
                raise ValueError(f"{name}: dtype {dtype} cannot be exported")
            nbytes = _nbytes(shape, dtype)
            if groups[-1] and size + nbytes > limit:
                groups.append([])
                size = 0
            groups[-1].append((name, tuple(int(d) for d in shape), dtype))
            size += nbytes
        self._where: dict[str, tuple[int, int, tuple[int, ...], torch.dtype]] = {}   # name → (shard, offset, …)
        self._files: list[str] = []
        self.total_size = 0
        self._handle: Optional[tuple[int, object]] = None
        # replaces only an earlier export (its witscale_export.json) or an empty directory: output_dir.py
        self._dir = DirectoryWriter(out_dir, EXPORT_KIND)
        self._tmp = self._dir.tmp
        try:
            for i, group in enumerate(groups):
                fname = "model.safetensors" if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
                header, offset = {"__metadata__": {"format": "pt"}}, 0
                for name, shape, dtype in group:
                    nbytes = _nbytes(shape, dtype)
                    header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape),
                                    "data_offsets": [offset, offset + nbytes]}
                    offset += nbytes
                raw = json.dumps(header, separators=(",", ":")).encode()
                raw += b" " * (-len(raw) % 8)              # the data starts 8-byte aligned
                start = 8 + len(raw)
                with open(os.path.join(self._tmp, fname), "wb") as f:
                    f.write(len(raw).to_bytes(8, "little"))
                    f.write(raw)
                    f.truncate(start + offset)
                for name, shape, dtype in group:
                    self._where[name] = (i, start + header[name]["data_offsets"][0], shape, dtype)
                self._files.append(fname)
                self.total_size += offset
        except OSError as e:
            raise self._failed(e) from None
        except BaseException:
            self.abort()
            raise
        self._written: set[str] = set()

    def _failed(self, e: OSError) -> OutputError:
        """An OSError while writing (a full disk …): everything written so far removed, one line naming the
        output and the errno."""
        err = self._dir.error(e)
        self.abort()
        return err

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._where:
            raise ValueError(f"tensor {name} is not part of the model being exported")
        if name in self._written:
            raise ValueError(f"tensor {name} written twice")
        shard, offset, shape, dtype = self._where[name]
        if tuple(tensor.shape) != shape:
            raise ValueError(f"tensor {name} has shape {tuple(tensor.shape)}, the config implies {shape} "
                             "(a tensor-parallel shard, or padded vocabulary rows?)")
        t = tensor.detach().to("cpu", dtype).contiguous()
        try:
            if self._handle is None or self._handle[0] != shard:
                self._close_handle()
                self._handle = (shard, open(os.path.join(self._tmp, self._files[shard]), "r+b"))
            f = self._handle[1]
            f.seek(offset)
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
        except OSError as e:
            if e.filename is None:
                e.filename = os.path.join(self._tmp, self._files[shard])
            raise self._failed(e) from None
        self._written.add(name)

    def _close_handle(self) -> None:
        if self._handle is not None:
            f = self._handle[1]
            f.flush()
            os.fsync(f.fileno())
            f.close()
            self._handle = None

    @property
    def tmp_dir(self) -> str:
        """The directory being filled: extra files (tokenizer …) go here before ``commit``."""
        return self._tmp

    def commit(self) -> None:
        """Check that every planned tensor was written, add the index and config.json, fsync, and rename the
        directory into place (an existing ``out_dir`` is replaced only now)."""
        try:
            self._close_handle()
            missing = [n for n in self._where if n not in self._written]
            if missing:
                raise ValueError(f"export incomplete: {len(missing)} tensors never written, e.g. {missing[0]}")
            if len(self._files) > 1:
                weight_map = {name: self._files[w[0]] for name, w in self._where.items()}
                with open(os.path.join(self._tmp, INDEX), "w", encoding="utf-8") as f:
                    json.dump({"metadata": {"total_size": self.total_size}, "weight_map": weight_map}, f, indent=1)
            with open(os.path.join(self._tmp, "config.json"), "w", encoding="utf-8") as f:
                json.dump(self.config, f, indent=2)
            with open(os.path.join(self._tmp, EXPORT_MARKER), "w", encoding="utf-8") as f:
                json.dump({"format": EXPORT_FORMAT, "version": 1, "files": sorted(os.listdir(self._tmp))}, f,
                          indent=1)
        except OSError as e:
            raise self._failed(e) from None
        except BaseException:
            self.abort()
            raise
        self._dir.commit()          # swapped into place; an OSError there is an OutputError already

    def abort(self) -> None:
        try:
            if self._handle is not None:
                self._handle[1].close()
                self._handle = None
        except Exception:
            pass
        self._dir.abort()

    def os_error(self, e: OSError) -> OutputError:
        """The one line for an OSError met while filling ``tmp_dir`` (tokenizer files …); aborts."""
        return self._failed(e)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            if isinstance(exc, OSError):
                raise self._failed(exc) from None
            self.abort()


def model_plan(config, dtype: torch.dtype) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """Every tensor of an HF checkpoint of ``config`` (a ModelConfig), in the canonical export order:
    the embedding, layer by layer, the final norm, the LM head (not when tied)."""
    from witscale.model.transformer import dense_shapes

    return [(name, tuple(shape), dtype) for name, shape in dense_shapes(config).items()]


def save_hf_checkpoint(state_dict: dict[str, torch.Tensor], config, out_dir: str, max_shard_size="5GB", *,
                       max_shard_bytes: Optional[int] = None) -> None:
    """Write an HF model directory (safetensors shards + index + config.json) atomically from an in-memory
    state dict: the same writer as the streaming export (``HFShardWriter``). ``config`` is a ModelConfig
    (checked against the state dict) or a dict."""
    if hasattr(config, "to_hf_dict"):
        state = _check_state_dict(state_dict, config)
        cfg = config.to_hf_dict()
        plan = [(name, tuple(shape), state[name].dtype) for name, shape, _ in model_plan(config, torch.float32)]
    else:
        state, cfg = dict(state_dict), dict(config)
        plan = [(name, tuple(state[name].shape), state[name].dtype) for name in sorted(state)]
    if not state:
        raise ValueError("save_hf_checkpoint: empty state dict")
    with HFShardWriter(out_dir, plan, cfg, max_shard_size, max_shard_bytes=max_shard_bytes) as writer:
        for name, _, _ in plan:
            writer.write(name, state[name])
        writer.commit()
