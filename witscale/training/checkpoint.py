"""Resumable checkpoints: DeepSpeed's engine state plus witscale's client state, committed atomically.

Layout under ``<output-dir>/checkpoints``:

    step_00000100/            one DeepSpeed checkpoint (tag), model/optimizer shards of every rank
        rng_rank00003.pt      torch RNG state of each rank (DeepSpeed saves client state from one rank only)
        witscale_state.json   step, loader position, fingerprints, layout — written LAST, after every rank finished
        universal/            DeepSpeed universal checkpoint of the tag, made when a run at another dp/tp resumes
    latest                    the tag of the newest *complete* checkpoint (replaced atomically)

A crash in the middle of a save leaves a tag directory without ``witscale_state.json`` and ``latest``
still naming the previous checkpoint, which stays loadable. Only the last ``keep`` complete checkpoints
are kept; older ones are renamed out of sight (``.deleting.<tag>``) at once and deleted by a background
thread of rank 0, outside every collective.

Before loading, every rank checks the tag's files (``damaged_files``: each ``.pt`` is a complete zip
archive, the state JSON parses) and the ranks agree with one all-reduce; ``--resume auto`` then falls back
to the newest older complete checkpoint that passes (``choose``). A checkpoint of another dp or tp is loaded
through DeepSpeed's universal checkpoint (``layout_change``, ``universal_tag``, ``load(universal=True)``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import zipfile
from typing import Optional

import torch
import torch.distributed as dist

from witscale.training.faults import injected, slow_conversion_seconds

log = logging.getLogger("witscale")

STATE_FILE = "witscale_state.json"
LATEST = "latest"
TRASH_PREFIX = ".deleting."
UNIVERSAL = "universal"      # <tag>/universal: DeepSpeed universal checkpoint of that tag, made on demand


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
    """Collective: every rank calls it. Returns the tag written.

    Rank 0 does only short work between the two barriers (two small atomic writes and renames of the
    checkpoints to drop); the deletion itself runs afterwards in a background thread (``_prune``)."""
    tag = tag_for(step)
    rank = dist.get_rank()
    if rank == 0:       # a stale commit of this step (after a fall-back past it) must not make it look complete
        _unlink(os.path.join(root, tag, STATE_FILE))
    if not hasattr(engine.module, "universal_checkpoint_info"):    # DeepSpeed saves it in the model states
        engine.module.universal_checkpoint_info = universal_info(engine.module)
    engine.save_checkpoint(root, tag=tag, save_latest=False)
    torch.save(_rng_state(), os.path.join(root, tag, f"rng_rank{rank:05d}.pt"))
    dist.barrier()                      # every rank's shards are on disk before the commit
    if injected("crash_in_save", step):   # die where a real crash would hurt most: shards written, no commit
        os._exit(17)
    trash = []
    if rank == 0:
        _atomic_write(os.path.join(root, tag, STATE_FILE), json.dumps(client_state, indent=1))
        _atomic_write(os.path.join(root, LATEST), tag)
        trash = _retire(root, tag, keep)
        log.info(f"checkpoint {tag} saved")
    dist.barrier()
    if trash:
        _prune(trash)
    if injected("kill_after_save", step):
        os.kill(os.getpid(), 9)
    return tag


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _retire(root: str, current: str, keep: int) -> list[str]:
    """Rank 0: rename the complete checkpoints beyond the newest ``keep`` up to ``current`` (which `latest`
    names, never retired) to ``.deleting.<tag>`` — one metadata operation each, so they stop counting at once
    — and return those paths, plus leftovers of a deletion an earlier process did not finish. Tags newer than
    ``current`` (left by a fall-back past a damaged checkpoint) are not counted and not touched."""
    trash = [os.path.join(root, t) for t in os.listdir(root) if t.startswith(TRASH_PREFIX)]
    if keep <= 0:
        return trash
    older = [t for t in complete_tags(root) if t < current]
    for old in older[:max(0, len(older) - (keep - 1))]:
        dst = os.path.join(root, f"{TRASH_PREFIX}{old}")
        try:
            os.replace(os.path.join(root, old), dst)
        except OSError as e:
            if os.path.exists(dst):       # a leftover of the same name: clear it first, then retry
                shutil.rmtree(dst, ignore_errors=True)
                os.replace(os.path.join(root, old), dst)
            else:
                log.warning(f"could not retire checkpoint {old}: {e}")
                continue
        if dst not in trash:
            trash.append(dst)
    return trash


_TAG_NAME = re.compile(r"step_\d{8}")


def retire_partial_tags(root: str) -> list[str]:
    """Rank 0, at start: the tag directories a killed save left — witscale's own names (``step_%08d``) without
    ``witscale_state.json`` and newer than the tag `latest` names (all of them when there is no `latest`) —
    renamed to ``.deleting.<tag>`` and returned for ``_prune``. Complete tags, older ones and anything else
    stay (a complete tag newer than `latest` is a fall-back's, docs/checkpoints.md). Deleted in the background
    (``_prune``), like retired checkpoints."""
    if not os.path.isdir(root):
        return []
    try:
        latest = open(os.path.join(root, LATEST), encoding="utf-8").read().strip()
    except FileNotFoundError:
        latest = ""
    trash = []
    for tag in sorted(os.listdir(root)):
        path = os.path.join(root, tag)
        if (not _TAG_NAME.fullmatch(tag) or tag <= latest or not os.path.isdir(path)
                or os.path.exists(os.path.join(path, STATE_FILE))):
            continue
        dst = os.path.join(root, f"{TRASH_PREFIX}{tag}")
        if os.path.exists(dst):
            shutil.rmtree(dst, ignore_errors=True)
        os.replace(path, dst)
        log.warning(f"{path}: an incomplete checkpoint (no {STATE_FILE}; a save was killed): removing it")
        trash.append(dst)
    _prune(trash)
    return trash


_pruners: list[threading.Thread] = []
_in_deletion: set[str] = set()
_lock = threading.Lock()


def _prune(paths: list[str]) -> Optional[threading.Thread]:
    """Delete retired checkpoints in a background thread of rank 0 (rmtree releases the GIL; the other ranks
    never wait for it). Not a daemon: a normal exit finishes the deletion; a killed process leaves
    ``.deleting.*`` directories that the next save removes."""
    with _lock:
        paths = [p for p in paths if p not in _in_deletion]
        _in_deletion.update(paths)
    if not paths:
        return None

    def work():
        for p in paths:
            shutil.rmtree(p, ignore_errors=True)
            with _lock:
                _in_deletion.discard(p)
    _pruners[:] = [t for t in _pruners if t.is_alive()]
    t = threading.Thread(target=work, name="witscale-prune-checkpoints", daemon=False)
    t.start()
    _pruners.append(t)
    return t


def wait_for_pruning() -> None:
    """Block until background deletions finished (tests; never needed for correctness)."""
    for t in list(_pruners):
        t.join()


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


def damaged_files(root: str, tag: str) -> list[str]:
    """One line per file of ``root/tag`` that cannot be loaded: ``<path>: <what is wrong>``. Cheap: a ``.pt``
    file (torch's zip format) is checked by its central directory, which sits at the end of the file, and by
    its members' extents — a truncated file (a node crash, a half-finished copy) fails both. Data bytes are
    not read (a flipped bit inside is found by the load itself, which names the file as well)."""
    d = os.path.join(root, tag)
    problems = []
    try:
        with open(os.path.join(d, STATE_FILE), encoding="utf-8") as f:
            json.load(f)
    except (OSError, ValueError) as e:
        problems.append(f"{os.path.join(d, STATE_FILE)}: {_one_line(e)}")
    try:
        names = sorted(os.listdir(d))
    except OSError as e:
        return problems + [f"{d}: {_one_line(e)}"]
    for name in names:
        if name.endswith(".pt"):
            why = torch_file_problem(os.path.join(d, name))
            if why:
                problems.append(f"{os.path.join(d, name)}: {why}")
    return problems


def torch_file_problem(path: str) -> Optional[str]:
    """What is wrong with a file written by torch.save (None if its structure is whole)."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "empty (0 bytes)"
        with zipfile.ZipFile(path) as z:
            members = z.infolist()
    except zipfile.BadZipFile as e:
        return f"truncated or not a torch.save archive ({size} bytes; {_one_line(e)})"
    except (OSError, RuntimeError, ValueError) as e:
        return f"unreadable ({_one_line(e)})"
    if not any(m.filename.endswith("data.pkl") for m in members):
        return "a zip archive without torch's data.pkl"
    for m in members:
        if m.header_offset + m.compress_size > size:
            return f"truncated: member {m.filename} ends past the file's {size} bytes"
    return None


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def agree_sound(local_problems: list[str], device) -> tuple[bool, bool]:
    """Collective (one all-reduce on ``device``, the trainer's): (no rank found a problem, every rank did)."""
    flag = torch.tensor([1, -1] if local_problems else [0, 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag[0].item()) == 0, int(flag[1].item()) == -1


def choose(resume: str, root: str, device) -> Optional[tuple[str, str]]:
    """Collective: (root, tag) to load, checked on every rank before anything is loaded (DeepSpeed's load is
    collective: the ranks must agree on one checkpoint). ``--resume auto`` falls back from a damaged
    checkpoint to the newest older complete one that passes, and logs which and why; ``--resume PATH``
    names what is damaged in one line (``CheckpointError``). A problem every rank sees is logged by rank 0,
    one that only some ranks see (a node-local copy) by each of them."""
    if resume == "auto":    # `latest` naming an incomplete tag (its step being saved again) is one more damage
        latest = os.path.join(root, LATEST)
        if not os.path.exists(latest):
            return None
        found = (root, open(latest, encoding="utf-8").read().strip())
        candidates = [found] + [(root, t) for t in reversed(complete_tags(root)) if t < found[1]]
    else:
        candidates = [resolve_resume(resume, root)]
    rank = dist.get_rank()
    for i, (r, tag) in enumerate(candidates):
        problems = damaged_files(r, tag)
        sound, everywhere = agree_sound(problems, device)
        if sound:
            if i > 0 and rank == 0:
                log.warning(f"--resume auto: falling back to {os.path.join(r, tag)}, the newest complete "
                            f"checkpoint that loads")
            return r, tag
        where = os.path.join(r, tag)
        what = problems[0] if problems else "a file damaged as another rank sees it (see that rank's log)"
        if problems and (rank == 0 or not everywhere):
            for p in problems:
                log.warning(f"checkpoint {where} cannot be loaded"
                            f"{'' if everywhere else f' (as rank {rank} sees it)'}: {p}")
        if i + 1 == len(candidates):
            raise CheckpointError(f"checkpoint {where} cannot be loaded: {what}"
                                  + ("" if i == 0 else " (and no older complete checkpoint loads)"))
    return None


def read_state(root: str, tag: str) -> dict:
    with open(os.path.join(root, tag, STATE_FILE), encoding="utf-8") as f:
        return json.load(f)


def load(engine, root: str, tag: str, *, universal: bool = False, topo=None) -> dict:
    """Collective: restore the engine (model, optimizer, schedule) and this rank's RNG; return client state.
    ``universal``: through the tag's universal checkpoint (another dp or tp; ``topo`` the new layout). A file that torch
    cannot read is named in a one-line ``CheckpointError``."""
    client_state = read_state(root, tag)
    ce = engine.checkpoint_engine
    plain_load = ce.load

    def named_load(path, *a, **k):
        try:
            return plain_load(path, *a, **k)
        except Exception as e:          # noqa: BLE001 - torch's zip errors are RuntimeErrors of many kinds
            raise CheckpointError(f"{path}: cannot be loaded ({_one_line(e)})") from e

    ce.load = named_load
    ds_tag, marked, groups, was_group = tag, [], None, None
    if universal:
        from deepspeed.utils import groups
        ds_tag = universal_tag(root, tag)
        if topo is not None and topo.tp > 1:
            marked = _tp_restore_meta(engine.module, topo.tp)
            was_group = groups._TENSOR_MODEL_PARALLEL_GROUP       # DeepSpeed asks it for the rank's tp slice
            groups._TENSOR_MODEL_PARALLEL_GROUP = topo.tp_group
    was_universal = engine._config.load_universal_checkpoint
    engine._config.load_universal_checkpoint = universal
    try:
        path, _ = engine.load_checkpoint(root, tag=ds_tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    finally:
        ce.__dict__.pop("load", None)
        engine._config.load_universal_checkpoint = was_universal
        if marked:
            from deepspeed.checkpoint.constants import DS_AUTOTP_UC_META
            for p in marked:
                delattr(p, DS_AUTOTP_UC_META)
            groups._TENSOR_MODEL_PARALLEL_GROUP = was_group
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load {os.path.join(root, ds_tag)}")
    if universal and engine.zero_optimization_stage() == 3:
        _restore_group_hyperparameters(engine, os.path.join(root, ds_tag))
    rng_file = os.path.join(root, tag, f"rng_rank{dist.get_rank():05d}.pt")
    if os.path.exists(rng_file):
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return client_state


def _restore_group_hyperparameters(engine, universal_dir: str) -> None:
    """DeepSpeed's universal load gives every parameter group the hyperparameters of group 0 (ZeRO-3:
    ``load_hp_checkpoint_state_from_checkpoint_dir_stage3``) — witscale's no-decay group (norms) would get
    weight decay. Set each group's own (weight_decay, betas, eps, lr, …) back from the saved optimizer state."""
    path = os.path.join(universal_dir, "zero", "optimizer_state.pt")
    if not os.path.exists(path):
        return
    saved = torch.load(path, map_location="cpu", weights_only=False).get("optimizer_state_dict", {})
    saved_groups = saved.get("param_groups") or []
    groups = engine.optimizer.param_groups
    if len(saved_groups) != len(groups):
        raise CheckpointError(f"{path}: {len(saved_groups)} parameter groups saved, the optimizer has {len(groups)}")
    for group, saved_group in zip(groups, saved_groups):
        for key, value in saved_group.items():
            if key != "params":
                group[key] = value
    # It also gives every group's state one shared ``step`` tensor, which Adam then advances once per group.
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def check_fingerprints(client_state: dict, *, data_fp: str, model_fp: str, allow_data_change: bool,
                       where: str) -> None:
    if client_state.get("model_fingerprint") != model_fp:
        raise CheckpointError(f"{where} was trained with a different model configuration "
                              f"({client_state.get('model_fingerprint')} ≠ {model_fp})")
    if client_state.get("data_fingerprint") != data_fp and not allow_data_change:
        raise CheckpointError(f"{where} was trained on different data ({client_state.get('data_fingerprint')} "
                              f"≠ {data_fp}); pass --allow-data-change to continue on new data")


def layout_change(client_state: dict, layout: dict, *, where: str, zero_stage: int) -> bool:
    """True when the checkpoint was written at another dp or tp (resumable through DeepSpeed's universal
    checkpoint, ``universal_tag``); False when the layout is the same or was not recorded (older checkpoints;
    DeepSpeed then checks what it can). Another pp, any change under pp > 1 and another tp under ZeRO-0 (no
    optimizer partitions to convert) are refused in one line."""
    saved = client_state.get("layout")
    if not saved or all(int(saved[k]) == int(layout[k]) for k in ("dp", "tp", "pp")):
        return False
    fmt = lambda d: " ".join(f"{k}={d[k]}" for k in ("dp", "tp", "pp"))  # noqa: E731
    if int(saved["pp"]) != int(layout["pp"]) or int(layout["pp"]) > 1:
        raise CheckpointError(f"{where} was written at {fmt(saved)}; this run is {fmt(layout)}: resuming on another "
                              f"layout under pipeline parallelism is not supported yet — run at {fmt(saved)}")
    if zero_stage == 0 and int(saved["tp"]) != int(layout["tp"]):
        raise CheckpointError(f"{where} was written at {fmt(saved)}; this run is {fmt(layout)}: another tp needs "
                              f"DeepSpeed's universal checkpoint, which needs ZeRO ≥ 1 — run at tp={saved['tp']}")
    return True


def universal_info(module) -> dict:
    """DeepSpeed's UNIVERSAL_CHECKPOINT_INFO for witscale's layers (the module attribute DeepSpeed saves in every
    checkpoint's model states):
    how ``ds_to_universal`` merges tensor-parallel slices back into dense tensors — replicated (no
    ``tp_split_dim``), row-parallel (cut along dim 1: o, down), vocabulary-padded (trimmed to the real
    vocabulary); everything else is column-parallel (cut along dim 0, DeepSpeed's default)."""
    import re
    rep, row, vocab, vocab_size = [], [], [], None
    for name, p in module.named_parameters():
        dim = getattr(p, "tp_split_dim", None)
        pattern = f"^{re.escape(name)}$"
        if dim is None:
            rep.append(pattern)
        elif dim == 1:
            row.append(pattern)
        elif getattr(p, "padded_dense_rows", None) is not None:
            vocab.append(pattern)
    for m in module.modules():
        if hasattr(m, "padded_vocab_size") and hasattr(m, "vocab_size"):
            vocab_size = int(m.vocab_size)
    info = {"tp_replicated_parameter_patterns": rep, "parameter_with_row_parallelism_patterns": row,
            "vocabulary_parameter_patterns": vocab}
    if vocab_size is not None:
        info["original_vocab_size"] = vocab_size
    return info


def _tp_restore_meta(module, tp: int) -> list:
    """Per-parameter tp restore metadata for DeepSpeed's ZeRO-3 universal load (``_resolve_autotp_partition``):
    which dim this rank's slice is cut along and the dense shape. Returns the parameters marked."""
    from deepspeed.checkpoint.constants import DS_AUTOTP_UC_META
    marked = []
    if tp == 1:
        return marked
    for name, p in module.named_parameters():
        dim = getattr(p, "tp_split_dim", None)
        shape = list(getattr(p, "ds_shape", p.shape))
        if dim is None:
            meta = {"replicated": True, "partition_dim": None}
        else:
            shape[dim] *= tp
            rows = getattr(p, "padded_dense_rows", None)
            vocab = next((int(m.vocab_size) for m in module.modules() if hasattr(m, "padded_vocab_size")), None)
            if rows is not None and vocab is not None and rows != vocab:
                raise CheckpointError(f"resuming at tp={tp} pads the vocabulary of {name} from {vocab} to {rows} rows: "
                                      f"another tp with vocabulary padding is not supported yet")
            meta = {"partition_dim": dim, "logical_shape": shape}
        setattr(p, DS_AUTOTP_UC_META, meta)
        marked.append(p)
    return marked


def universal_tag(root: str, tag: str) -> str:
    """Every rank: the tag of ``root/tag``'s DeepSpeed universal checkpoint (``<tag>/universal``), converted by
    rank 0 with DeepSpeed's ``ds_to_universal`` the first time it is needed (into a temporary directory renamed
    into place; an interrupted conversion's temporary directory is removed and the conversion starts over) —
    per-parameter fp32 weights and Adam moments that any data-parallel size loads (``checkpoint.load_universal``).
    The others wait for the directory to appear, not in a collective: at 70B the conversion reads and writes
    the whole optimizer state (tens of minutes), longer than any collective timeout should be; if rank 0 fails
    meanwhile, the PeerFailureWatch ends them (distributed.py)."""
    out = os.path.join(root, tag, UNIVERSAL)
    if dist.get_rank() == 0 and not os.path.isdir(out):
        from deepspeed.checkpoint import ds_to_universal
        for old in os.listdir(os.path.join(root, tag)):       # left by a conversion killed earlier
            if old.startswith(f"{UNIVERSAL}.tmp"):
                shutil.rmtree(os.path.join(root, tag, old), ignore_errors=True)
        tmp = f"{out}.tmp{os.getpid()}"
        if slow_conversion_seconds():
            time.sleep(slow_conversion_seconds())       # test-only (witscale/training/faults.py)
        workers = int(os.environ.get("WITSCALE_UNIVERSAL_WORKERS", "4" if torch.cuda.is_available() else "1"))
        log.warning(f"{os.path.join(root, tag)}: converting to a universal checkpoint for the new layout "
                    f"(DeepSpeed ds_to_universal, {workers} worker(s))")
        ds_to_universal.main(argparse.Namespace(input_folder=os.path.join(root, tag), output_folder=tmp,
                                                num_extract_workers=workers, num_merge_workers=max(1, workers // 2),
                                                keep_temp_folder=False, strict=True, inject_missing_state=False))
        _wrap_bare_tensors(tmp)
        os.replace(tmp, out)
    while not os.path.isdir(out):
        time.sleep(2)
    return f"{tag}/{UNIVERSAL}"


def _wrap_bare_tensors(universal_dir: str) -> None:
    """ds_to_universal writes a tp=1 ZeRO-3 checkpoint's states as bare tensors, and DeepSpeed's ZeRO-3
    universal load slices a tensor-parallel shard only out of the ``{"param": tensor}`` form the tp>1
    merge writes: give every state that form (a no-op for the others)."""
    from deepspeed.checkpoint.constants import PARAM
    zero = os.path.join(universal_dir, "zero")
    for name in os.listdir(zero):
        for state in ("fp32", "exp_avg", "exp_avg_sq"):
            path = os.path.join(zero, name, f"{state}.pt")
            if os.path.exists(path):
                t = torch.load(path, map_location="cpu", weights_only=False)
                if torch.is_tensor(t):
                    torch.save({PARAM: t}, path)



def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
