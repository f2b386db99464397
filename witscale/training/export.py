"""Export a trained model as an HF directory that ``transformers.AutoModelForCausalLM`` loads.

Two entry points, both streaming (one dense tensor in memory at a time, written straight into its place in
a safetensors shard by ``HFShardWriter``; nothing is pickled), in bf16 by default (``dtype='fp32'`` for
full precision; config.json's ``torch_dtype`` says which):
- ``export_from_engine``: at the end of training (``--export-hf``), from the live engine, any layout
  (ZeRO-0..3 × tp × pp); collective, rank 0 writes (witscale/model/state.py ``iter_dense_tensors``).
- ``export_checkpoint``: offline, from a witscale checkpoint of any layout (``tools/export_hf.py``); one
  process, reading DeepSpeed's files parameter by parameter (``CheckpointReader``).
Both write into a temporary directory renamed into place, so a failed export never leaves something that
looks like a model.

Reading DeepSpeed's files. DeepSpeed writes its model and optimizer states with ``torch.save`` — pickle.
They are read here only with ``torch.load(weights_only=True, mmap=True)``: torch's restricted unpickler,
which builds tensors and plain containers and refuses every other global (no code runs from the file),
with exactly the DeepSpeed types its checkpoints hold allow-listed (``checkpoint.safe_globals``, the one list
resume uses too: ``ZeroStageEnum``, an ``IntEnum``, the loss scalers and ZeRO-1/2's ``fragment_address``, plain
attribute holders: rebuilt with ``__new__`` and their saved ``__dict__``; nothing else from DeepSpeed is trusted). ``mmap`` maps the tensors' storage: a parameter's bytes are read when it is
copied, so the whole checkpoint is never loaded. Which file holds what:
- ZeRO-0/1/2 (tp ranks ``mp_rank_XX_model_states.pt``'s ``module``) and pipelines (one
  ``layer_LL-model_TT-model_states.pt`` per block and tp rank): the module's weights in the training
  dtype (fp32 on the CPU; bf16 on a bf16 GPU run, whose fp32 master copy sits in the ZeRO-1/2 optimizer
  partitions and is not read — an fp32 export of a bf16 run is the bf16 weights, exactly, as the live
  export's is, and both log a warning saying so);
- ZeRO-3 (``zero_pp_rank_D_mp_rank_TT_optim_states.pt``): the fp32 master partitions, merged per parameter
  in the order of the model states' ``param_shapes`` (DeepSpeed's ``zero_to_fp32`` layout: the same
  partition sizes from its ``zero3_partitioned_param_info``).
Tensor-parallel shards are concatenated along the dimension witscale's layers split them
(``tp_split_dim``, read off a model built on the meta device) and the vocabulary padding is trimmed.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
from typing import Iterator, Optional

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


def _writer(model_config, out_dir: str, dtype, max_shard_size):
    from witscale.model.hf_io import HFShardWriter, export_dtype, model_plan

    dtype = export_dtype(dtype)
    return HFShardWriter(out_dir, model_plan(model_config, dtype), model_config.to_hf_dict(), max_shard_size), dtype


def _write_meta(tmp_dir: str, meta: Optional[dict]) -> None:
    """witscale.json (template, class table, weights, normalization) and the packer's template as the
    tokenizer's chat_template, so that the model is prompted as it was trained (witscale/data/template_jinja.py)."""
    if not meta:
        return
    from witscale.data.template_jinja import EXPORT_META, add_chat_template
    with open(os.path.join(tmp_dir, EXPORT_META), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    if meta.get("template"):
        add_chat_template(tmp_dir, meta["template"])


def _finish(writer, out_dir: str, tokenizer_src: Optional[str], n: int, dtype, meta: Optional[dict] = None) -> None:
    copied = copy_tokenizer_files(tokenizer_src, writer.tmp_dir)
    _write_meta(writer.tmp_dir, meta)
    writer.commit()
    # generation_config.json travels with the tokenizer files but is none: a directory without any says so
    tokenizer = [name for name in copied if name != "generation_config.json"]
    extra = ", generation_config.json" if len(tokenizer) < len(copied) else ""
    none = (f"none in {tokenizer_src}" if tokenizer_src else "none") + " (give --tokenizer)"
    log.info(f"exported HF model to {out_dir} ({n} tensors, {str(dtype).replace('torch.', '')}; tokenizer files: "
             f"{', '.join(tokenizer) or none}{extra})")


def write_hf_dir(state: dict[str, torch.Tensor], model_config, out_dir: str, tokenizer_src: Optional[str],
                 dtype="fp32", max_shard_size="5GB", meta: Optional[dict] = None) -> None:
    """An in-memory dense state dict (tests, small models) → an HF directory, through the same writer."""
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    with_names = [(k, v) for k, v in state.items()
                  if not (k == "lm_head.weight" and model_config.tie_word_embeddings)]
    writer, dtype = _writer(model_config, out_dir, dtype, max_shard_size)
    with writer:
        for name, t in with_names:
            writer.write(name, t)
        _finish(writer, out_dir, tokenizer_src, len(with_names), dtype, meta)


def export_module(module, topo, model_config, out_dir: str, tokenizer_src: Optional[str] = None, dtype="bf16",
                  max_shard_size="5GB", meta: Optional[dict] = None) -> None:
    """Collective over all ranks: stream the live module's dense tensors to rank 0, which writes them."""
    from witscale.model.hf_io import export_dtype
    from witscale.model.state import iter_dense_tensors

    torch_dtype = export_dtype(dtype)
    _warn_upcast({getattr(p, "ds_tensor", p).dtype for p in module.parameters()}, torch_dtype)
    writer = _writer(model_config, out_dir, dtype, max_shard_size)[0] if dist.get_rank() == 0 else None
    n = 0
    try:
        for name, t in iter_dense_tensors(module, topo, torch_dtype):
            writer.write(name, t)
            n += 1
        if writer is not None:
            _finish(writer, out_dir, tokenizer_src, n, torch_dtype, meta)
    except OSError as e:            # a full disk …: one line naming the path (witscale/data/output_dir.py)
        if writer is None:
            raise
        raise writer.os_error(e) from None
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    dist.barrier()


def _warn_upcast(weight_dtypes: set, dtype: torch.dtype) -> None:
    low = sorted(str(d).replace("torch.", "") for d in weight_dtypes if d in (torch.bfloat16, torch.float16))
    if dtype == torch.float32 and low and (not dist.is_initialized() or dist.get_rank() == 0):
        log.warning(f"exporting fp32 from {'/'.join(low)} weights: the files hold those weights exactly, upcast "
                    "(the optimizer's fp32 master copy is not what is exported)")


# Paths of a run directory that training writes: an export there would replace them (witscale/train.py).
RUN_ENTRIES = ("checkpoints", "metrics.jsonl", "train.log", "model_config.json", "effective_config.json",
               "tensorboard")


def check_export_path(export_dir: str, output_dir: str) -> None:
    """Refuse (OutputError, one line) before training an --export-hf that would replace the run's own files:
    the run's --output-dir itself, a directory containing it, or one of the entries training writes in it
    (checkpoints/ …), symbolic links resolved; and anything at the path that an export may not replace (a file,
    a non-empty directory that is not a witscale export). A fresh subdirectory of the run (``OUT/hf``, what the
    sweep templates use) is fine: the export replaces only that directory, and only an earlier export there."""
    from witscale.data.output_dir import OutputError, check_target, path_relation
    from witscale.model.hf_io import EXPORT_KIND

    relation = path_relation(export_dir, output_dir)
    if relation in ("equal", "contains"):
        what = "is" if relation == "equal" else "contains"
        raise OutputError(f"--export-hf {export_dir} {what} the run's --output-dir {output_dir}: the export would "
                          f"replace the run's checkpoints and metrics; choose another directory")
    if relation == "inside":
        first = os.path.relpath(os.path.realpath(export_dir), os.path.realpath(output_dir)).split(os.sep)[0]
        if first in RUN_ENTRIES:
            raise OutputError(f"--export-hf {export_dir} is the run's own {first} (inside --output-dir "
                              f"{output_dir}): choose another directory, e.g. {os.path.join(output_dir, 'hf')}")
    try:
        check_target(export_dir, EXPORT_KIND)
    except OutputError as e:
        raise OutputError(f"--export-hf {e}") from None


def export_from_engine(trainer, model_config, out_dir: str, tokenizer_src: Optional[str] = None,
                       dtype="bf16", meta: Optional[dict] = None) -> None:
    """Collective: ``--export-hf`` at the end of training; rank 0 writes the directory."""
    export_module(trainer.engine.module, trainer.topo, model_config, out_dir, tokenizer_src, dtype, meta=meta)


# --- offline ------------------------------------------------------------------------------------------
def _safe_load(path: str):
    """A DeepSpeed ``torch.save`` file through torch's restricted unpickler (see the module docstring)."""
    from witscale.training.checkpoint import safe_globals      # the one allow-list of checkpoint types

    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: unreadable checkpoint file ({str(e).splitlines()[0]})") from None


_LAYER_FILE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt$")
_ZERO_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_MP_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")


class CheckpointReader:
    """The dense HF-named tensors of a witscale (DeepSpeed) checkpoint directory of any layout, one at a
    time: ``for name, tensor in CheckpointReader(dir, cfg)``. Only the files a tensor lives in are mapped;
    each tensor is assembled (ZeRO-3 partitions, then TP shards) when it is asked for."""

    def __init__(self, ckpt_dir: str, model_config, dtype: torch.dtype = torch.float32):
        self.dir, self.cfg, self.dtype = ckpt_dir, model_config, dtype
        self._warned = False
        files = os.listdir(ckpt_dir)
        self.layer_files = {(int(m.group(1)), int(m.group(2))): os.path.join(ckpt_dir, f)
                            for f in files if (m := _LAYER_FILE.match(f))}
        self.zero_files = {(int(m.group(1)), int(m.group(2))): os.path.join(ckpt_dir, f)
                           for f in files if (m := _ZERO_FILE.match(f))}
        self.mp_files = {int(m.group(1)): os.path.join(ckpt_dir, f) for f in files if (m := _MP_FILE.match(f))}
        if self.layer_files:
            self.layout = "pipeline"
            self.tp = 1 + max(t for _, t in self.layer_files)
        elif any(f.startswith("zero_pp_rank_") and f.endswith("_model_states.pt") for f in files):
            # ZeRO-3 writes its model states per (dp, tp) rank, without the parameters (they are partitioned).
            self.layout = "zero3"
            self.tp = 1 + max(t for _, t in self.zero_files)
            self.dp = 1 + max(d for d, _ in self.zero_files)
        elif self.mp_files:
            self.layout = "module"
            self.tp = len(self.mp_files)
        else:
            raise FileNotFoundError(f"{ckpt_dir}: no DeepSpeed model states")
        self.split = self._split_dims()

    def _split_dims(self) -> dict[str, Optional[int]]:
        """HF name → the dimension witscale's TP layers cut it along at the checkpoint's tp (a model built on
        the meta device, at tp 1: with fewer KV heads than that tp, k/v were replicated, not cut)."""
        from witscale.model.transformer import CausalLM
        from witscale.parallel.layers import kv_heads_replicated

        with torch.device("meta"):
            model = CausalLM(self.cfg)
        split = {name: getattr(p, "tp_split_dim", None) for name, p in model.named_parameters()}
        if kv_heads_replicated(self.cfg.num_key_value_heads, self.tp):
            names = {id(p): name for name, p in model.named_parameters()}
            for layer in model.model.layers:
                for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                    for p in proj.parameters():
                        split[names[id(p)]] = None
        return split

    def describe(self) -> str:
        return f"{self.layout} checkpoint, tp {self.tp}" + (f", dp {self.dp}" if self.layout == "zero3" else "")

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        from witscale.model.transformer import dense_shapes

        shapes = dense_shapes(self.cfg)
        shards = {"pipeline": self._pipeline_shards, "zero3": self._zero3_shards, "module": self._module_shards}
        for name, parts in shards[self.layout]():
            if name not in shapes or (name == "lm_head.weight" and self.cfg.tie_word_embeddings):
                continue
            yield name, self._assemble(name, parts, tuple(shapes[name]))
            del parts

    def _assemble(self, name: str, parts: list, shape: tuple[int, ...]) -> torch.Tensor:
        if not self._warned:
            _warn_upcast({p.dtype for p in parts}, self.dtype)
            self._warned = True
        """The dense tensor in the export dtype from its TP shards (memory-mapped, or ZeRO-3 pieces): one
        output buffer, each shard cast straight into its place (vocabulary padding rows skipped)."""
        dim = self.split.get(name) if len(parts) > 1 else None
        if len(parts) == 1 and self.layout == "zero3" and tuple(parts[0].shape) == shape:
            return parts[0]                     # already assembled in the export dtype
        out = torch.empty(shape, dtype=self.dtype)
        if dim is None:
            src = parts[0]
            if tuple(src.shape) != shape and (src.dim() != len(shape) or src.shape[0] < shape[0]
                                              or tuple(src.shape[1:]) != shape[1:]):
                raise ValueError(f"{self.dir}: {name} has shape {tuple(src.shape)}, the config says {shape}")
            out.copy_(src[:shape[0]] if tuple(src.shape) != shape else src)
            return out
        offset = 0
        for part in parts:
            take = min(part.shape[dim], shape[dim] - offset)
            if take > 0:
                out.narrow(dim, offset, take).copy_(part.narrow(dim, 0, take))
            offset += part.shape[dim]
        if offset < shape[dim] or (offset > shape[dim] and dim != 0):
            raise ValueError(f"{self.dir}: {name}'s {len(parts)} shards hold {offset} along dimension {dim}, "
                             f"the config says {shape}")
        return out

    # The files are memory-mapped: pages a tensor was read from stay mapped into the process (file-backed,
    # reclaimable, but counted in its resident set) until the mapping goes. So a file whose tensors are
    # read one by one is mapped afresh after every REMAP_BYTES read from it.
    REMAP_BYTES = 256 << 20

    def _module_shards(self):
        load = lambda: [_safe_load(self.mp_files[t])["module"] for t in range(self.tp)]  # noqa: E731
        states, read = load(), 0
        for key in list(states[0]):
            name = key[len("module."):] if key.startswith("module.") else key
            parts = [s[key] for s in states]
            read += sum(t.numel() * t.element_size() for t in parts)
            yield name, parts
            del parts
            if read > self.REMAP_BYTES:
                states, read = None, 0
                states = load()

    def _pipeline_shards(self):
        from witscale.model.hf_names import pipe_to_hf_name

        n = self.cfg.num_hidden_layers
        tied = self.cfg.tie_word_embeddings
        for idx in sorted({i for i, _ in self.layer_files}):
            lost = [t for t in range(self.tp) if (idx, t) not in self.layer_files]
            if lost:
                raise FileNotFoundError(f"{self.dir}: layer_{idx:02d}-model_{lost[0]:02d}-model_states.pt is missing")
            states = [_safe_load(self.layer_files[(idx, t)]) for t in range(self.tp)]
            for key in states[0]:
                if tied and idx in (0, n + 2):
                    if key != "embed_tokens.weight":
                        continue                       # the tied head shares the embedding's weight
                    name = "model.embed_tokens.weight"
                else:
                    name = pipe_to_hf_name(f"{idx}.{key}", self.cfg)
                yield name, [s[key] for s in states]
            del states

    def _zero3_shards(self):
        from deepspeed.utils.zero_to_fp32 import zero3_partitioned_param_info

        per_tp = []
        for t in range(self.tp):
            models = sorted(glob.glob(os.path.join(self.dir, f"zero_pp_rank_*_mp_rank_{t:02d}_model_states.pt")))
            if not models:
                raise FileNotFoundError(f"{self.dir}: no ZeRO-3 model states of tp rank {t}")
            shapes = {k: v for d in _safe_load(models[0])["param_shapes"] for k, v in d.items()}
            for d in range(self.dp):
                if (d, t) not in self.zero_files:
                    raise FileNotFoundError(f"{self.dir}: optimizer states of dp rank {d}, tp rank {t} missing")
            flat = self._zero3_flat(t)
            offsets = [0]
            for g in flat[0]:
                offsets.append(offsets[-1] + g.numel())
            where, offset = {}, 0
            for key, shape in shapes.items():
                numel, _ = zero3_partitioned_param_info(shape.numel(), self.dp)
                where[key] = (offset, numel, shape)
                offset += numel
            if offset * self.dp != offsets[-1] * self.dp:
                raise ValueError(f"{self.dir}: ZeRO-3 partitions of tp rank {t} hold {offsets[-1]} elements per "
                                 f"rank, the parameters need {offset}")
            per_tp.append((flat, offsets, where))
        read = 0
        for key in per_tp[0][2]:
            parts = []
            for flat, offsets, where in per_tp:
                offset, numel, shape = where[key]
                parts.append(_merge_zero3(flat, offsets, offset, numel, shape, self.dtype))
                read += 4 * shape.numel()
            name = key[len("module."):] if key.startswith("module.") else key
            yield name, parts
            del parts
            if read > self.REMAP_BYTES:       # map the partitions afresh (see REMAP_BYTES)
                for t, entry in enumerate(per_tp):
                    entry[0].clear()
                    entry[0].extend(self._zero3_flat(t))
                read = 0

    def _zero3_flat(self, t: int) -> list:
        """Every dp rank's fp32 flat groups of tp rank ``t`` (memory-mapped)."""
        return [_safe_load(self.zero_files[(d, t)])["optimizer_state_dict"]["fp32_flat_groups"]
                for d in range(self.dp)]


def _merge_zero3(flat_groups, group_offsets, offset, partitioned_numel, shape, dtype) -> torch.Tensor:
    """One ZeRO-3 parameter from every dp rank's fp32 flat groups (DeepSpeed's layout, as its
    ``zero_to_fp32.GatheredTensor`` reads it: rank r holds elements [r·n, (r+1)·n) of the flattened
    parameter at ``offset`` of its groups' concatenation), cast piece by piece into one buffer."""
    numel = shape.numel()
    out = torch.empty(numel, dtype=dtype)
    for r, groups in enumerate(flat_groups):
        start = r * partitioned_numel
        want = min(partitioned_numel, numel - start)
        pos = offset
        while want > 0:
            g = max(i for i in range(len(groups)) if group_offsets[i] <= pos)
            local = pos - group_offsets[g]
            take = min(want, groups[g].numel() - local)
            out[start:start + take].copy_(groups[g][local:local + take])
            start, pos, want = start + take, pos + take, want - take
    return out.view(shape)


def _run_meta(run_dir: str, state: Optional[dict] = None) -> Optional[dict]:
    """witscale.json's content from the run's effective_config.json (None for a run without one); with
    --learn-weights the weights the checkpoint had learned (its ``state``), as the live export writes them."""
    from witscale.data.template_jinja import training_meta
    path = os.path.join(run_dir, "effective_config.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        eff = json.load(f)
    args = eff.get("args", {})
    weights = dict(eff.get("weight_table") or {})
    learned = (state or {}).get("learned_weights")
    if learned and args.get("learn_weights"):
        from witscale.data.classes import CLASS_NAMES
        from witscale.training.learned_weights import parse_learn_classes
        groups = parse_learn_classes(args.get("learn_classes") or "")
        if [g.name for g in groups] != learned.get("groups"):
            raise ValueError(f"{path}: --learn-classes {args.get('learn_classes')!r} does not match the checkpoint's "
                             f"learned groups {learned.get('groups')}")
        for g, lam in zip(groups, learned["lambda"]):
            weights.update({CLASS_NAMES[c]: float(lam) for c in g.classes})
    meta = training_meta(args.get("data"), weights, args.get("normalization"), args.get("objective", "sft"))
    if learned and args.get("learn_weights"):
        meta["learned_weights"] = {f"lambda_{name}": float(lam) for name, lam in zip(learned["groups"], learned["lambda"])}
    return meta


def _checkpoint_state(root: str, tag: str) -> Optional[dict]:
    from witscale.training.checkpoint import STATE_FILE, read_state
    return read_state(root, tag) if os.path.exists(os.path.join(root, tag, STATE_FILE)) else None


def export_checkpoint(checkpoint_path: str, out_dir: str, tokenizer_src: Optional[str] = None, dtype="bf16",
                      max_shard_size="5GB") -> None:
    """Offline: a witscale checkpoint of any layout (ZeRO-0..3 × tp × pp) → an HF directory, streamed."""
    from witscale.model import ModelConfig
    from witscale.model.hf_io import export_dtype
    from witscale.training.checkpoint import resolve_resume

    root, tag = resolve_resume(checkpoint_path, checkpoint_path)
    run_dir = os.path.dirname(os.path.abspath(root))
    config_path = os.path.join(run_dir, "model_config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path}: the run's model config is missing (written at start of training)")
    model_config = ModelConfig.from_json_file(config_path)
    reader = CheckpointReader(os.path.join(root, tag), model_config, export_dtype(dtype))
    log.info(f"exporting {os.path.join(root, tag)} ({reader.describe()})")
    writer, torch_dtype = _writer(model_config, out_dir, dtype, max_shard_size)
    n = 0
    with writer:
        for name, t in reader:
            writer.write(name, t)
            n += 1
        _finish(writer, out_dir, tokenizer_src, n, torch_dtype, _run_meta(run_dir, _checkpoint_state(root, tag)))
