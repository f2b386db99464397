"""Packed (varlen) causal attention: tokens attend only within their own segment (document).

Segments are given as ``cu_seqlens`` (int32) over the flattened [B*S] tokens, as the varlen kernels take
them. ``max_seqlen`` may be an upper bound of the longest segment (the pipeline passes the row length S
rather than reading the true maximum back from the GPU): every backend accepts that.

Backends, chosen once by ``select_backend`` and logged:
- ``varlen``: ``torch.nn.attention.varlen.varlen_attn``, the FlashAttention-2 kernels inside torch ≥ 2.10
  (CUDA, fp16/bf16, compute capability ≥ 8.0): O(Σ len²) work, no mask, no extra package. The CUDA
  default. Its keyword arguments changed in every release, so they are read from the signature, not
  from the version number (docs.pytorch.org per release; pytorch PRs #172238/#172245 and #179468):
    2.10  ``varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None)``:
          causal only, no sliding window, no GQA;
    2.11  ``(…, max_k, *, return_aux=None, scale=None, window_size=(-1, -1))`` (by the PR dates; not
          checked on a 2.11 install): ``is_causal`` is gone, causal is ``window_size=(-1, 0)``;
    2.12+ adds ``enable_gqa=False`` (and ``seqused_k``, ``block_table``, ``num_splits``).
  Without ``enable_gqa`` K/V are repeated to the query heads; without ``window_size``, a layer whose
  sliding window can bite (max_seqlen > window) goes to ``flash_varlen`` if installed, else ``dense``.
- ``flash_varlen``: flash-attn's ``flash_attn_varlen_func`` (CUDA, when the package is installed): the
  same kernels; the CUDA default when torch has no usable ``varlen_attn``.
- ``dense``: one SDPA over the batch with a [B, 1, S, S] block-diagonal causal (+window) mask built on the
  device from cu_seqlens: O(S²) whatever the documents, but no host sync (no ``.tolist()``, ``.item()``, boolean
  indexing or ``.nonzero()``), so it is the GPU fallback (fp32, older GPUs) and the reference the
  others are tested against. cu_seqlens is checked only when it lies on the CPU, where that is free.
- ``sdpa_grouped``: segments sorted by length and batched into groups of similar length (each at least
  half the group's longest), one causal SDPA per group over segments right-padded to that length — causal
  attention never lets a real token see the padding after it. O(Σ len²) up to a factor < 4 per segment,
  but a handful of kernel calls instead of one per document: the CPU default, much faster than
  ``sdpa_segments`` on many short documents. Reads cu_seqlens on the host (a sync on a GPU).
- ``sdpa_segments``: SDPA per segment with ``is_causal=True``; also O(Σ len²); on a 2048-token row of
  ~200-token documents ~7× faster than ``dense`` on CPU (ENVIRONMENT.md). Reads cu_seqlens on the host.

Sliding window (Mistral/Qwen2 in transformers): key j is visible from query i when 0 ≤ i − j < W. In the
FlashAttention convention (left, right) that is ``window_size=(W − 1, 0)``; plain causal is ``(-1, 0)``
(-1: unbounded). Every backend honours it.

Grouped-query attention (Hkv < Hq) uses SDPA's ``enable_gqa`` (torch ≥ 2.5) where a fused kernel takes
it — on CPU, and on CUDA without a mask — and repeats K/V otherwise: CUDA's memory-efficient kernel, the
one that takes ``dense``'s mask, has no GQA, so ``enable_gqa`` would send SDPA to its O(H·S²)-memory
math kernel.
"""
from __future__ import annotations

import functools
import inspect
import logging
from typing import Optional

import torch
import torch.nn.functional as F

try:
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:                                     # torch < 2.10
    _varlen_attn = None

log = logging.getLogger("witscale")
BACKENDS = ("auto", "varlen", "flash_varlen", "sdpa_grouped", "sdpa_segments", "dense")
_HALF = (torch.float16, torch.bfloat16)
_announced: set[str] = set()


def _announce(key: str, message: str) -> None:
    if key not in _announced:
        _announced.add(key)
        log.info(message)


@functools.lru_cache(maxsize=None)
def _flash_installed() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _flash_available() -> bool:
    return torch.cuda.is_available() and _flash_installed()


@functools.lru_cache(maxsize=None)
def _varlen_params(fn) -> frozenset:
    """The parameter names of this torch's varlen_attn (cached per function: inspect is slow)."""
    return frozenset(inspect.signature(fn).parameters)


@functools.lru_cache(maxsize=None)
def _sdpa_has_gqa() -> bool:
    """Whether SDPA takes ``enable_gqa`` (torch ≥ 2.5). It is a builtin: probe it once."""
    t = torch.zeros(1, 2, 1, 1)
    try:
        F.scaled_dot_product_attention(t, t[:, :1], t[:, :1], enable_gqa=True)
    except TypeError:
        return False
    return True


def _varlen_unusable(device: Optional[torch.device], dtype: Optional[torch.dtype]) -> Optional[str]:
    """Why the ``varlen`` backend cannot run on this device and dtype, or None when it can."""
    if _varlen_attn is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (it came in torch 2.10)"
    if not {"window_size", "is_causal"} & _varlen_params(_varlen_attn):
        return "this torch's varlen_attn has neither window_size nor is_causal: it cannot be made causal"
    if device is None or torch.device(device).type != "cuda":
        return f"it runs on CUDA only, not on {device}"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if dtype is not None and dtype not in _HALF:
        return f"its FlashAttention-2 kernels take fp16/bf16 only, not {dtype}"
    cc = torch.cuda.get_device_capability(device)
    if tuple(cc) < (8, 0):
        return f"its FlashAttention-2 kernels need compute capability ≥ 8.0, this GPU has {cc[0]}.{cc[1]}"
    return None


def select_backend(requested: str = "auto", device: Optional[torch.device] = None,
                   dtype: Optional[torch.dtype] = None) -> str:
    if requested not in BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r} (known: {', '.join(BACKENDS)})")
    backend, why = requested, ""
    if requested == "auto":
        if device is None or torch.device(device).type != "cuda":
            backend = "sdpa_grouped"
        else:
            why = _varlen_unusable(device, dtype)
            if why is None:
                backend = "varlen"
            elif (_flash_available() and (dtype is None or dtype in _HALF)
                  and tuple(torch.cuda.get_device_capability(device)) >= (8, 0)):   # FA2 needs Ampere+
                backend = "flash_varlen"
            else:
                backend = "dense"
    elif backend == "varlen":
        why = _varlen_unusable(device, dtype)
        if why:
            raise ValueError(f"attention backend varlen cannot run here: {why}")
    if backend == "flash_varlen" and not _flash_available():
        raise ValueError("attention backend flash_varlen needs CUDA and the flash-attn package")
    _announce(backend, f"packed attention backend: {backend}" + (f" (not varlen: {why})" if why else ""))
    return backend


def _window_mask(length: int, window: int, device) -> torch.Tensor:
    i = torch.arange(length, device=device)
    d = i[:, None] - i[None, :]
    return (d >= 0) & (d < window)


def _sdpa(q, k, v, **kwargs) -> torch.Tensor:
    """SDPA on [..., H, L, D] with k/v holding Hkv ≤ Hq heads (see the module docstring on GQA)."""
    rep = q.shape[-3] // k.shape[-3]
    if rep > 1:
        if _sdpa_has_gqa() and not (q.is_cuda and kwargs.get("attn_mask") is not None):
            kwargs["enable_gqa"] = True
        else:
            k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, *, backend: str, sliding_window: Optional[int] = None) -> torch.Tensor:
    """q [B, S, Hq, D], k/v [B, S, Hkv, D] → [B, S, Hq, D]; causal within each segment of cu_seqlens."""
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} key/value heads")
    # A window can only bite on a segment longer than it; max_seqlen bounds every segment.
    window_bites = bool(sliding_window) and max_seqlen > sliding_window
    if backend == "varlen":
        if _varlen_attn is None:
            raise ValueError(f"attention backend varlen cannot run here: {_varlen_unusable(q.device, q.dtype)}")
        if not (window_bites and "window_size" not in _varlen_params(_varlen_attn)):
            return _varlen(q, k, v, cu_seqlens, max_seqlen, sliding_window if window_bites else None)
        # torch 2.10: varlen_attn cannot do a sliding window; never drop the window silently.
        backend = "flash_varlen" if _flash_available() else "dense"
        _announce("varlen-window", f"packed attention: this torch's varlen_attn has no window_size; "
                                   f"sliding-window attention uses {backend}")
    if backend == "flash_varlen":
        from flash_attn import flash_attn_varlen_func

        window = (sliding_window - 1, 0) if sliding_window else (-1, -1)
        out = flash_attn_varlen_func(q.reshape(b * s, hq, d), k.reshape(b * s, hkv, d), v.reshape(b * s, hkv, d),
                                     cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True,
                                     window_size=window)
        return out.reshape(b, s, hq, d)
    if backend == "dense":
        return _dense(q, k, v, cu_seqlens, sliding_window)
    if backend == "sdpa_grouped" and not window_bites:
        return _grouped(q, k, v, _checked_bounds(cu_seqlens, b * s))
    qf = q.reshape(b * s, hq, d).transpose(0, 1)                                  # [H, B*S, D]
    kf, vf = (t.reshape(b * s, hkv, d).transpose(0, 1) for t in (k, v))
    out = torch.empty_like(qf)
    bounds = _checked_bounds(cu_seqlens, b * s)
    for start, end in zip(bounds[:-1], bounds[1:]):
        length = end - start
        if length == 0:
            continue
        qs, ks, vs = qf[:, start:end], kf[:, start:end], vf[:, start:end]
        if sliding_window and length > sliding_window:
            out[:, start:end] = _sdpa(qs, ks, vs, attn_mask=_window_mask(length, sliding_window, q.device))
        else:
            out[:, start:end] = _sdpa(qs, ks, vs, is_causal=True)
    return out.transpose(0, 1).reshape(b, s, hq, d)


def _varlen(q, k, v, cu_seqlens, max_seqlen: int, window: Optional[int]) -> torch.Tensor:
    """torch's varlen_attn on the flattened tokens; ``window`` only when this torch has window_size."""
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    params = _varlen_params(_varlen_attn)
    if cu_seqlens.device.type == "cpu":               # host data: checking it costs no device sync
        _checked_bounds(cu_seqlens, b * s)
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    qf = q.reshape(b * s, hq, d)
    kf, vf = k.reshape(b * s, hkv, d), v.reshape(b * s, hkv, d)
    kwargs = {}
    if hkv != hq:
        if "enable_gqa" in params:                    # torch ≥ 2.12
            kwargs["enable_gqa"] = True
        else:
            kf, vf = kf.repeat_interleave(hq // hkv, dim=1), vf.repeat_interleave(hq // hkv, dim=1)
    if "is_causal" in params and not window:          # 2.10 (is_causal is its only causal mode)
        kwargs["is_causal"] = True
    else:
        # A tuple, not a list: varlen_attn tests ``window_size == (-1, 0)`` to pick its causal path.
        kwargs["window_size"] = (window - 1, 0) if window else (-1, 0)
    out = _varlen_attn(qf, kf, vf, cu, cu, max_seqlen, max_seqlen, **kwargs)
    return out.reshape(b, s, hq, d)


def _checked_bounds(cu_seqlens: torch.Tensor, total: int) -> list[int]:
    """cu_seqlens as a list, after checking it partitions the ``total`` flattened tokens."""
    bounds = cu_seqlens.tolist()
    if cu_seqlens.dim() != 1 or len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != total or any(
            a > b for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to the {total} flattened tokens, got {bounds[:8]}"
                         + ("…" if len(bounds) > 8 else ""))
    return bounds


def _grouped(q, k, v, bounds: list[int], min_fraction: float = 0.5) -> torch.Tensor:
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    n = b * s
    # One zero row at index n: the gather target of every padding slot.
    qf = torch.cat([q.reshape(n, hq, d), q.new_zeros(1, hq, d)])
    kf, vf = (torch.cat([t.reshape(n, hkv, d), t.new_zeros(1, hkv, d)]) for t in (k, v))
    segments = sorted(((e - st, st) for st, e in zip(bounds[:-1], bounds[1:])), reverse=True)
    positions, values = [], []
    i = 0
    while i < len(segments):
        longest = segments[i][0]
        j = i
        while j < len(segments) and segments[j][0] >= min_fraction * longest:
            j += 1
        group = segments[i:j]
        i = j
        idx = torch.full((len(group), longest), n, dtype=torch.long)
        for row, (length, start) in enumerate(group):
            idx[row, :length] = torch.arange(start, start + length)
        idx = idx.to(q.device)
        qg, kg, vg = (t[idx].transpose(1, 2) for t in (qf, kf, vf))          # [G, H, L, D]
        out = _sdpa(qg, kg, vg, is_causal=True).transpose(1, 2)              # [G, L, Hq, D]
        real = idx < n
        positions.append(idx[real])
        values.append(out[real])
    merged = torch.zeros(n, hq, d, dtype=q.dtype, device=q.device).index_copy(
        0, torch.cat(positions), torch.cat(values))
    return merged.reshape(b, s, hq, d)


def _dense(q, k, v, cu_seqlens, sliding_window):
    """Block-diagonal causal (+window) mask from cu_seqlens, built on q's device with no host sync."""
    b, s, _, _ = q.shape
    if cu_seqlens.device.type == "cpu":               # host data: checking it costs no device sync
        bounds = set(_checked_bounds(cu_seqlens, b * s))
        if any(x not in bounds for x in range(0, b * s + 1, s)):
            # A row-local mask cannot express attention across rows; the other backends could, but
            # the packer never produces such segments, so this is a caller's error. (Unchecked on the
            # device: there such a segment is silently cut at the row boundary.)
            raise ValueError("dense attention: every row boundary must also be a cu_seqlens boundary")
    cu = cu_seqlens.to(q.device)
    token = torch.arange(b * s, device=q.device, dtype=cu.dtype)
    seg = torch.searchsorted(cu, token, right=True).view(b, s)          # segment id of every token
    i = torch.arange(s, device=q.device)
    dist = i[:, None] - i[None, :]                                       # query − key position
    allowed = (dist >= 0) & (dist < sliding_window) if sliding_window else dist >= 0
    mask = (seg[:, :, None] == seg[:, None, :]) & allowed
    out = _sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None])
    return out.transpose(1, 2)
