"""Resumable checkpoints: DeepSpeed's engine state plus witscale's client state, committed atomically.

Layout under ``<output-dir>/checkpoints``:

    step_00000100/            one DeepSpeed checkpoint (tag), model/optimizer shards of every rank
        rng_rank00003.pt      torch RNG state of each rank (DeepSpeed saves client state from one rank only)
        witscale_state.json   step, loader position, fingerprints, layout and the sha256 of every other file
                              of the tag — written LAST, after every rank finished (the commit marker)
        universal/            DeepSpeed universal checkpoint of the tag, made when a run at another dp/tp resumes
    latest                    the tag of the newest *complete* checkpoint (replaced atomically)

A crash in the middle of a save leaves a tag directory without ``witscale_state.json`` and ``latest``
still naming the previous checkpoint, which stays loadable. Only the last ``keep`` complete checkpoints
are kept; older ones are renamed out of sight (``.deleting.<tag>``) at once and deleted by a background
thread of rank 0, outside every collective.

At save every rank hashes the files it wrote (``digest_files``; streaming sha256, in parallel over ranks) and
rank 0 records them in the state file. Before loading, every rank checks the tag (``check_tag``: the state file
has its shape, each ``.pt`` is a complete zip archive, the files this rank verifies have their recorded size and
digest) and the ranks agree with one all-reduce; ``--resume auto`` then falls back to the newest older complete
checkpoint that passes (``choose``), naming why. Every file is unpickled by torch's ``weights_only`` loader with
DeepSpeed's few types allow-listed (``safe_load``, ``safe_globals``): a checkpoint never runs code.
A checkpoint of another dp, sp or tp is loaded
through DeepSpeed's universal checkpoint (``layout_change``, ``universal_tag``, ``load(universal=True)``).
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import signal
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch
import torch.distributed as dist

from witscale.training.faults import injected, kill_in_conversion, slow_conversion_seconds

log = logging.getLogger("witscale")

STATE_FILE = "witscale_state.json"
LATEST = "latest"
TRASH_PREFIX = ".deleting."
UNIVERSAL = "universal"      # <tag>/universal: DeepSpeed universal checkpoint of that tag, made on demand
TAG_PATTERN = re.compile(r"^step_\d{8,}$")     # what tag_for writes; anything else in `latest` is damage
DIGEST = "sha256"            # hashlib's fastest here (SHA-NI: ≈1 GB/s per core; blake2b ≈0.4, md5 ≈0.4)
DIGEST_BLOCK = 8 << 20       # files are read in 8-MiB blocks: memory stays bounded whatever a shard's size
DIGEST_THREADS = 4           # a rank's files are hashed concurrently (hashlib releases the GIL on large updates)


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
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _unlink(tmp)
        raise _write_error(e, path) from None


_INCOMPLETE = "; the checkpoint being saved is incomplete, `latest` still names the previous one"


def _write_error(e: BaseException, path: str) -> CheckpointError:
    """One line for a checkpoint file that could not be written, naming it and the errno. torch's zip writer
    reports a full disk as a RuntimeError ("unexpected pos …"), so there the filesystem's free space decides."""
    if isinstance(e, OSError):
        return CheckpointError(f"{e.filename or path}: [Errno {e.errno}] {e.strerror}{_INCOMPLETE}")
    try:
        st = os.statvfs(os.path.dirname(path) or ".")
        full = st.f_bavail * st.f_frsize < (1 << 20)
    except OSError:
        full = False
    if full:
        return CheckpointError(f"{path}: [Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)}{_INCOMPLETE}")
    return CheckpointError(f"{path}: cannot be written ({_one_line(e)}){_INCOMPLETE}")


def _save_file(save, obj, path: str, *a, **k):
    """``save(obj, path, …)`` (torch.save or a checkpoint engine's) with a write failure as one line."""
    try:
        return save(obj, path, *a, **k)
    except (OSError, RuntimeError) as e:
        raise _write_error(e, path) from None


def read_latest(root: str) -> Optional[str]:
    """The tag `latest` names, if it names a complete checkpoint; None when there is none yet."""
    path = os.path.join(root, LATEST)
    if not os.path.exists(path):
        return None
    tag, why = _latest_tag(root)
    if why:
        raise CheckpointError(why)
    if not os.path.exists(os.path.join(root, tag, STATE_FILE)):
        raise CheckpointError(f"{path} names {tag}, which is incomplete (no {STATE_FILE})")
    return tag


def _latest_tag(root: str) -> tuple[Optional[str], Optional[str]]:
    """(the tag `latest` names, None) or (None, what is wrong with `latest`: missing, empty, not a tag name)."""
    path = os.path.join(root, LATEST)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read(256).strip()
    except FileNotFoundError:
        return None, f"{path} is missing"
    except OSError as e:
        return None, f"{path}: {_one_line(e)}"
    if not text:
        return None, f"{path} is empty"
    if not TAG_PATTERN.match(text):
        return None, f"{path} names {text[:40]!r}, which is not a checkpoint tag (step_NNNNNNNN)"
    if not os.path.isdir(os.path.join(root, text)):
        return None, f"{path} names {text}, which does not exist"
    return text, None


def complete_tags(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    return sorted(t for t in os.listdir(root) if TAG_PATTERN.match(t)
                  and os.path.exists(os.path.join(root, t, STATE_FILE)))


def file_digest(path: str, algorithm: str = DIGEST) -> tuple[int, str]:
    """(size in bytes, hex digest) of ``path``, streamed in ``DIGEST_BLOCK`` blocks into one reused buffer."""
    h = hashlib.new(algorithm)
    buf = bytearray(DIGEST_BLOCK)
    view = memoryview(buf)
    size = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return size, h.hexdigest()


def digest_files(tag_dir: str, names: list[str], rank: int) -> dict:
    """``{name: {"bytes", DIGEST, "rank"}}`` for files of ``tag_dir`` (names relative to it) that ``rank`` wrote,
    hashed by up to ``DIGEST_THREADS`` threads. Every rank hashes only its own files: a checkpoint of N ranks
    is hashed N-fold in parallel, each rank reading what it has just written (still in the page cache)."""
    def one(name):
        size, hexdigest = file_digest(os.path.join(tag_dir, name))
        return name, {"bytes": size, DIGEST: hexdigest, "rank": rank}
    if not names:
        return {}
    with ThreadPoolExecutor(min(DIGEST_THREADS, len(names))) as pool:
        return dict(pool.map(one, names))


def save(engine, root: str, step: int, client_state: dict, keep: int) -> str:
    """Collective: every rank calls it. Returns the tag written.

    Every rank hashes the files it wrote (``digest_files``) and the gather of those digests to rank 0 is the
    first barrier. Rank 0 then does only short work before the second (hashing DeepSpeed's two copied scripts,
    two small atomic writes, renames of the checkpoints to drop); the deletion itself runs afterwards in a
    background thread (``_prune``)."""
    tag = tag_for(step)
    tag_dir = os.path.join(root, tag)
    rank = dist.get_rank()
    if rank == 0:       # a stale commit of this step (after a fall-back past it) must not make it look complete,
        _unlink(os.path.join(tag_dir, STATE_FILE))      # nor its universal conversion outlive the files it came from
        shutil.rmtree(os.path.join(tag_dir, UNIVERSAL), ignore_errors=True)
    if not hasattr(engine.module, "universal_checkpoint_info"):    # DeepSpeed saves it in the model states
        engine.module.universal_checkpoint_info = universal_info(engine.module)
    written = _saving(engine, root, tag)
    if injected("kill_in_save", step):  # SIGKILL in the middle of a save (rank '*': every rank)
        os.kill(os.getpid(), signal.SIGKILL)
    rng_file = os.path.join(tag_dir, f"rng_rank{rank:05d}.pt")
    _save_file(torch.save, _rng_state(), rng_file)
    mine = digest_files(tag_dir, sorted({os.path.relpath(p, tag_dir) for p in written + [rng_file]}), rank)
    # The gather is the barrier: a rank sends its digests only once its files are on disk.
    every = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(mine, every, dst=0)
    if injected("crash_in_save", step):   # die where a real crash would hurt most: shards written, no commit
        os._exit(17)
    trash = []
    if rank == 0:
        files = {name: entry for d in every for name, entry in d.items()}
        files.update(digest_files(tag_dir, _unrecorded(tag_dir, files), 0))  # DeepSpeed's copied scripts
        client_state = {**client_state, "digests": {"algorithm": DIGEST, "files": files}}
        _atomic_write(os.path.join(tag_dir, STATE_FILE), json.dumps(client_state, indent=1))
        _atomic_write(os.path.join(root, LATEST), tag)
        trash = _retire(root, tag, keep)
        log.info(f"checkpoint {tag} saved")
    dist.barrier()
    if trash:
        _prune(trash)
    if injected("kill_after_save", step):
        os.kill(os.getpid(), 9)
    return tag


def _saving(engine, root: str, tag: str) -> list[str]:
    """``engine.save_checkpoint`` of ``tag``; returns the paths this rank wrote (every DeepSpeed file goes
    through its checkpoint engine's ``save``, recorded on the way)."""
    ce = engine.checkpoint_engine
    plain_save = ce.save
    written = []

    def recording_save(state_dict, path, *a, **k):
        written.append(os.path.abspath(path))
        return _save_file(plain_save, state_dict, path, *a, **k)

    ce.save = recording_save
    try:
        engine.save_checkpoint(root, tag=tag, save_latest=False)
    finally:
        ce.__dict__.pop("save", None)
    return written


def _unrecorded(tag_dir: str, recorded: dict) -> list[str]:
    """Files of the tag that no rank recorded (DeepSpeed's zero_to_fp32.py, copied without its engine)."""
    names = []
    for here, dirs, files in os.walk(tag_dir):
        if here == tag_dir:
            dirs[:] = [d for d in dirs if d != UNIVERSAL]
        for f in files:
            name = os.path.relpath(os.path.join(here, f), tag_dir)
            if name != STATE_FILE and name not in recorded and ".tmp" not in f:
                names.append(name)
    return sorted(names)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _retire(root: str, current: str, keep: int) -> list[str]:
    """Rank 0: rename the complete checkpoints beyond the newest ``keep`` up to ``current`` (which `latest`
    names, never retired) to ``.deleting.<tag>`` — one metadata operation each, so they stop counting at once
    — and return those paths, plus leftovers of a deletion an earlier process did not finish. Tags newer than
    ``current`` (left by a fall-back past a damaged checkpoint) are not counted and not touched. Unless
    ``current`` is recorded finite, the newest older checkpoint that is stays (``recorded_finite``)."""
    trash = [os.path.join(root, t) for t in os.listdir(root) if t.startswith(TRASH_PREFIX)]
    if keep <= 0:
        return trash
    older = [t for t in complete_tags(root) if t < current]
    retired = older[:max(0, len(older) - (keep - 1))]
    if retired and not recorded_finite(root, current):
        finite = [t for t in older if recorded_finite(root, t)]
        if finite and finite[-1] in retired:
            retired.remove(finite[-1])
    for old in retired:
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


def recorded_finite(root: str, tag: str) -> bool:
    """Does the tag's state record that its values were finite at save (``Trainer.save_checkpoint`` checks
    the weights and writes ``finite: true``)? A state without the field (an older witscale) or unreadable: no."""
    try:
        return read_state(root, tag).get("finite") is True
    except (OSError, ValueError, AttributeError):
        return False
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


def damaged_files(root: str, tag: str, rank: int = 0, world: int = 1) -> list[str]:
    """One line per problem of ``root/tag`` as ``rank`` of ``world`` checks it (``check_tag``)."""
    return check_tag(root, tag, rank, world)[0]


def check_tag(root: str, tag: str, rank: int = 0, world: int = 1) -> tuple[list[str], bool]:
    """(one line per problem, ``<path>: <what is wrong>``; whether the tag records digests). Checked:

    - ``witscale_state.json`` parses and has its shape (``state_problem``);
    - each ``.pt`` file is whole as a zip archive (``torch_file_problem``: a few KiB read per file);
    - with digests (checkpoints since they were recorded): this rank's share of the listed files — those it
      wrote, when the run has as many ranks as the one that saved; one in ``world`` otherwise — exists, has
      its recorded size and, read in full, its recorded digest; each shared file is verified by one rank.
      Only those files get the zip check too, so the ranks' work stays 1/``world`` of the checkpoint.

    Without digests (an older checkpoint) every ``.pt`` gets the zip check and data bytes are not read. Either
    way each ``.pt`` file's pickle is vetted by one rank (``_pickle_problem``): a crafted file is damage too."""
    d = os.path.join(root, tag)
    state_path = os.path.join(d, STATE_FILE)
    problems, digests = [], None
    try:
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
        why = state_problem(state)
        if why:
            problems.append(f"{state_path}: {why}")
        else:
            digests = state.get("digests")
    except (OSError, ValueError) as e:
        problems.append(f"{state_path}: {_one_line(e)}")
    if digests is not None:
        files = digests["files"]
        mine = [name for i, name in enumerate(sorted(files)) if int(files[name].get("rank", i)) % world == rank]
        if mine:
            with ThreadPoolExecutor(min(DIGEST_THREADS, len(mine))) as pool:
                found = pool.map(lambda name: _file_problem(d, name, files[name], digests["algorithm"]), mine)
                problems += [p for p in found if p]
        return problems, True
    try:
        names = sorted(os.listdir(d))
    except OSError as e:
        return problems + [f"{d}: {_one_line(e)}"], False
    for i, name in enumerate(n for n in names if n.endswith(".pt")):
        why = torch_file_problem(os.path.join(d, name))
        if not why and i % world == rank:       # each pickle vetted by one rank
            why = _pickle_problem(os.path.join(d, name))
        if why:
            problems.append(why if why.startswith(d) else f"{os.path.join(d, name)}: {why}")
    return problems, False


def _file_problem(tag_dir: str, name: str, entry: dict, algorithm: str) -> Optional[str]:
    """What is wrong with one file listed in the state's digests: missing, another size, a zip archive that
    is not whole (named before its digest: the clearer reason), other bytes. None if it is as saved."""
    path = os.path.join(tag_dir, name)
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        return f"{path}: missing (listed in {STATE_FILE})"
    except OSError as e:
        return f"{path}: {_one_line(e)}"
    if name.endswith(".pt"):
        why = torch_file_problem(path)
        if why:
            return f"{path}: {why}"
    if size != entry["bytes"]:
        return f"{path}: {size} bytes, {entry['bytes']} recorded at save"
    try:
        _, found = file_digest(path, algorithm)
    except OSError as e:
        return f"{path}: {_one_line(e)}"
    if found != entry[algorithm]:
        return f"{path}: {algorithm} {found[:16]}… ≠ {entry[algorithm][:16]}… recorded at save (its bytes changed)"
    return _pickle_problem(path) if name.endswith(".pt") else None


def _pickle_problem(path: str) -> Optional[str]:
    """A file whose pickle asks for more than ``safe_globals`` (crafted, its digest forged too): found before the
    collective load, so the ranks agree on it like on any damage. Memory-mapped: only the pickle is read."""
    try:
        safe_load(path, mmap=True)
    except CheckpointError as e:
        return str(e)
    return None


def state_problem(state) -> Optional[str]:
    """What is wrong with the shape of a parsed ``witscale_state.json`` (None if it has the keys resume reads)."""
    if not isinstance(state, dict):
        return f"not a JSON object but {type(state).__name__}"
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return "no 'step'" if "step" not in state else f"'step' is {step!r}, not a step number"
    if not isinstance(state.get("loader"), dict):
        return "no 'loader'" if "loader" not in state else "'loader' is not an object"
    for key in ("layout", "args"):
        if key in state and not isinstance(state[key], dict):
            return f"'{key}' is not an object"
    if "digests" not in state:
        return None
    digests = state["digests"]
    if (not isinstance(digests, dict) or not isinstance(digests.get("files"), dict)
            or digests.get("algorithm") not in hashlib.algorithms_available):
        return "'digests' is not {algorithm, files}"
    algorithm = digests["algorithm"]
    for name, entry in digests["files"].items():
        if (os.path.isabs(name) or ".." in name.replace("\\", "/").split("/") or not isinstance(entry, dict)
                or not isinstance(entry.get("bytes"), int) or not isinstance(entry.get(algorithm), str)
                or not isinstance(entry.get("rank", 0), int)):
            return f"'digests' entry {name[:60]!r} is malformed"
    return None


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


def safe_globals() -> list:
    """The only non-tensor types a checkpoint may make torch's ``weights_only`` unpickler build: what DeepSpeed
    0.19's ZeRO-0…3, bf16 and pipeline checkpoints pickle (ZeRO-1/2: ``fragment_address`` in the parameter slice
    mappings; ZeRO ≥ 1 fp32: ``LossScaler``, ``ZeroStageEnum``; ``DynamicLossScaler`` for fp16 ones) —
    tests/test_checkpoint_damage.py saves each kind and loads it through here. One list, also the export's."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


_UNSUPPORTED_GLOBAL = re.compile(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)")   # torch's two wordings


def safe_load(path: str, map_location="cpu", mmap: bool = False):
    """``torch.load`` of a checkpoint file through torch's restricted unpickler (``weights_only=True``) with
    ``safe_globals()`` allowed: no code in the file runs. A file that asks for anything else — a crafted
    pickle calling ``os.system`` — or cannot be read is named in a one-line ``CheckpointError``."""
    # Allowed process-wide, not by the safe_globals context: that one is not thread-safe (check_tag's threads).
    torch.serialization.add_safe_globals(safe_globals())
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        asked = _UNSUPPORTED_GLOBAL.search(str(e))
        what = f"it asks to call {asked.group(1)}" if asked else "its pickle holds something else"
        raise CheckpointError(f"{path}: refused: {what}, which is not a type a checkpoint holds "
                              f"(loaded with torch's weights_only unpickler; nothing in it was run)") from None
    except Exception as e:          # noqa: BLE001 - torch's zip errors are RuntimeErrors of many kinds
        raise CheckpointError(f"{path}: cannot be loaded ({_one_line(e)})") from e


def refuse_unsafe_pickles(directory: str) -> None:
    """Unpickle every ``.pt`` under ``directory`` through ``safe_load`` (memory-mapped: the pickles only, no
    tensor bytes read) before code that loads them with ``weights_only=False`` — DeepSpeed's ``ds_to_universal``
    and its universal loader — sees them. ``CheckpointError`` names the first file refused."""
    for here, _, files in os.walk(directory):
        for name in sorted(files):
            if name.endswith(".pt"):
                safe_load(os.path.join(here, name), mmap=True)


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
    collective: the ranks must agree on one checkpoint). Each rank checks its share (``check_tag``) and the
    ranks agree with one all-reduce; only on damage do they exchange what they found, so that rank 0 names it.
    ``--resume auto`` falls back from a damaged checkpoint — or from a `latest` that is missing, empty or
    names no tag — to the newest older complete one that passes, and logs which and why; ``--resume PATH``
    names what is damaged in one line (``CheckpointError``)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    note = None
    if resume == "auto":
        tag, note = _latest_tag(root)
        if tag is not None:     # `latest` naming an incomplete tag (its step being saved again) is one more damage
            candidates = [(root, tag)] + [(root, t) for t in reversed(complete_tags(root)) if t < tag]
        else:
            candidates = [(root, t) for t in reversed(complete_tags(root))]
            if not candidates:
                if not os.path.exists(os.path.join(root, LATEST)):
                    return None                 # nothing saved yet: start fresh
                raise CheckpointError(f"--resume auto: {note}, and no complete checkpoint exists")
            if rank == 0:
                log.warning(f"--resume auto: {note}: trying the newest complete checkpoint")
    else:
        candidates = [resolve_resume(resume, root)]
    for i, (r, tag) in enumerate(candidates):
        where = os.path.join(r, tag)
        problems, verified = check_tag(r, tag, rank, world)
        sound, _ = agree_sound(problems, device)
        if sound:
            if rank == 0:
                if not verified:
                    log.warning(f"checkpoint {where} has no digests (written before witscale recorded them): "
                                f"its files were checked for structure only")
                if i > 0 or note:
                    log.warning(f"--resume auto: falling back to {where}, the newest complete checkpoint that "
                                f"passes its checks")
            return r, tag
        found = _gather_problems(problems, world)
        if rank == 0:
            for p in found:
                log.warning(f"checkpoint {where} cannot be loaded: {p}")
        if i + 1 == len(candidates):
            raise CheckpointError(f"checkpoint {where} cannot be loaded: {found[0]}"
                                  + ("" if i == 0 else " (and no older complete checkpoint loads)"))
    return None


def _gather_problems(problems: list[str], world: int) -> list[str]:
    """Collective, on damage only: every rank's problem lines, in rank order, each once."""
    every = [None] * world
    dist.all_gather_object(every, problems)
    return list(dict.fromkeys(p for ps in every for p in ps))


def read_state(root: str, tag: str) -> dict:
    with open(os.path.join(root, tag, STATE_FILE), encoding="utf-8") as f:
        return json.load(f)


def load(engine, root: str, tag: str, *, universal: bool = False, topo=None) -> dict:
    """Collective: restore the engine (model, optimizer, schedule) and this rank's RNG; return client state.
    ``universal``: through the tag's universal checkpoint (another dp, sp or tp; ``topo`` the new layout). A file
    that torch cannot read is named in a one-line ``CheckpointError``."""
    client_state = read_state(root, tag)
    ce = engine.checkpoint_engine

    def named_load(path, map_location=None):    # DeepSpeed's engine would unpickle (weights_only=False)
        return safe_load(path, map_location=map_location)

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
    except (AssertionError, OSError) as e:      # a file DeepSpeed looks for and does not find (older checkpoints)
        raise CheckpointError(f"DeepSpeed could not load {os.path.join(root, ds_tag)}: {_one_line(e)}") from e
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
        _set_rng_state(safe_load(rng_file))
    return client_state


def _restore_group_hyperparameters(engine, universal_dir: str) -> None:
    """DeepSpeed's universal load gives every parameter group the hyperparameters of group 0 (ZeRO-3:
    ``load_hp_checkpoint_state_from_checkpoint_dir_stage3``) — witscale's no-decay group (norms) would get
    weight decay. Set each group's own (weight_decay, betas, eps, lr, …) back from the saved optimizer state."""
    path = os.path.join(universal_dir, "zero", "optimizer_state.pt")
    if not os.path.exists(path):
        return
    saved = safe_load(path).get("optimizer_state_dict", {})
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
    """True when the checkpoint was written at another dp, sp or tp (resumable through DeepSpeed's universal
    checkpoint, ``universal_tag``); False when the layout is the same or was not recorded (older checkpoints;
    DeepSpeed then checks what it can). Another pp, any change under pp > 1 and another tp under ZeRO-0 (no
    optimizer partitions to convert) are refused in one line.

    Another sp is a change of the data-parallel world alone: ZeRO partitions over dp × sp (DeepSpeed is given
    the dp × sp group, which names its files), sp peers read the same rows and the loader's global batch is
    micro × accum × dp — so sp 2 → 1 is converted exactly as dp 2 → 1 is (docs/checkpoints.md)."""
    saved = client_state.get("layout")
    if not saved:
        return False
    keys = ("dp", "sp", "tp", "pp")
    sizes = lambda d: {k: int(d.get(k, 1)) for k in keys}  # noqa: E731 - sp is recorded only when > 1
    saved, now = sizes(saved), sizes(layout)
    if saved == now:
        return False
    fmt = lambda d: layout_text(d, now if d is saved else saved, ("dp", "tp", "pp"))  # noqa: E731
    if saved["pp"] != now["pp"] or now["pp"] > 1:
        raise CheckpointError(f"{where} was written at {fmt(saved)}; this run is {fmt(now)}: resuming on another "
                              f"layout under pipeline parallelism is not supported yet — run at {fmt(saved)}")
    if zero_stage == 0 and saved["tp"] != now["tp"]:
        raise CheckpointError(f"{where} was written at {fmt(saved)}; this run is {fmt(now)}: another tp needs "
                              f"DeepSpeed's universal checkpoint, which needs ZeRO ≥ 1 — run at tp={saved['tp']}")
    return True


def layout_text(layout: dict, other: dict, keys=("dp", "tp")) -> str:
    """``dp=2 tp=1``: ``layout`` in a message about a change from or to ``other``, with ``sp=N`` after dp where
    either has sp > 1."""
    with_sp = max(int(layout.get("sp", 1)), int(other.get("sp", 1))) > 1
    return " ".join(f"{k}={int(layout.get(k, 1))}" for k in (keys[:1] + ("sp",) * with_sp + keys[1:]))


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
    """Every rank: the tag of ``root/tag``'s DeepSpeed universal checkpoint (``<tag>/universal``) — per-parameter
    fp32 weights and Adam moments that any data-parallel size loads (``checkpoint.load_universal``). The Slurm
    templates make it before the training step, as a job step of its own (``witscale.training.layout_conversion``);
    where it is not there yet, rank 0 makes it now (``convert_to_universal``) while the others wait until rank 0 has
    converted and vetted it (``_wait_until_vetted``), not in a collective: at 70B the conversion reads and writes
    the whole optimizer state (tens of minutes), longer than any collective timeout should be; if rank 0 fails
    meanwhile, the PeerFailureWatch ends them (distributed.py)."""
    out = os.path.join(root, tag, UNIVERSAL)
    if dist.get_rank() == 0 and not os.path.isdir(out):
        convert_to_universal(root, tag)
    if dist.get_rank() == 0:        # made now or found (left by an earlier resume, the conversion step, or crafted)
        refuse_unsafe_pickles(out)
    _wait_until_vetted(out)
    return f"{tag}/{UNIVERSAL}"


def convert_to_universal(root: str, tag: str) -> str:
    """One process: ``root/tag``'s universal checkpoint, made with DeepSpeed's ``ds_to_universal`` in a staging
    directory ``<tag>/universal.tmp<pid>`` and renamed into place, so that ``<tag>/universal`` is only ever whole. The
    tag's own files are only read. An interrupted conversion (killed, preempted, out of time) leaves its temporary
    directory, which the next conversion removes before it starts over. Returns ``<tag>/universal``'s path."""
    from deepspeed.checkpoint import ds_to_universal

    tag_dir = os.path.join(root, tag)
    out = os.path.join(tag_dir, UNIVERSAL)
    refuse_unsafe_pickles(tag_dir)
    for old in os.listdir(tag_dir):       # left by a conversion killed earlier
        if old.startswith(f"{UNIVERSAL}.tmp"):
            log.warning(f"{os.path.join(tag_dir, old)}: removing an interrupted conversion's partial output")
            shutil.rmtree(os.path.join(tag_dir, old), ignore_errors=True)
    # ds_to_universal also writes a `latest_universal` file beside its output folder: inside the staging directory
    # too, so that the tag itself is never written to.
    staging = f"{out}.tmp{os.getpid()}"
    tmp = os.path.join(staging, UNIVERSAL)
    if slow_conversion_seconds():
        time.sleep(slow_conversion_seconds())       # test-only (witscale/training/faults.py)
    workers = int(os.environ.get("WITSCALE_UNIVERSAL_WORKERS", "4" if torch.cuda.is_available() else "1"))
    log.warning(f"{tag_dir}: converting to a universal checkpoint for the new layout "
                f"(DeepSpeed ds_to_universal, {workers} worker(s))")
    ds_to_universal.main(argparse.Namespace(input_folder=tag_dir, output_folder=tmp,
                                            num_extract_workers=workers, num_merge_workers=max(1, workers // 2),
                                            keep_temp_folder=False, strict=True, inject_missing_state=False))
    _wrap_bare_tensors(tmp)
    if kill_in_conversion():
        os.kill(os.getpid(), signal.SIGKILL)        # test-only: everything written, nothing renamed
    os.replace(tmp, out)
    shutil.rmtree(staging, ignore_errors=True)
    return out


def _wait_until_vetted(out: str) -> None:
    """Every rank but 0 waits, outside any collective, until rank 0 has converted *and vetted* ``out``
    (DeepSpeed's universal loader unpickles: a directory found there, crafted, must be refused before any rank
    loads it). Rank 0 says so under a key of the rendezvous store; without a store (a test's adopted group),
    the directory's appearance is the signal."""
    from witscale.training.distributed import _default_store
    # Keyed by the directory, not the tag name: one process may resume from two runs' step_N (tests do).
    store, key = _default_store(), f"witscale/universal_vetted/{os.path.abspath(out)}"
    if dist.get_rank() == 0:
        if store is not None:
            store.set(key, "1")
        return
    while not (store.check([key]) if store is not None else os.path.isdir(out)):
        time.sleep(1)


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
                t = safe_load(path)
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
