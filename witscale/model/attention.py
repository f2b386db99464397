"""Packed (varlen) causal attention: tokens attend only within their own segment (document).

Segments are given as ``cu_seqlens`` over the flattened [B*S] tokens, as flash-attn's varlen API takes
them. Backends, chosen once by ``select_backend`` and logged:
- ``flash_varlen``: flash-attn's ``flash_attn_varlen_func`` (CUDA, when installed): O(Σ len²) work, no mask.
- ``sdpa_segments``: SDPA per segment with ``is_causal=True``; also O(Σ len²). The CPU default: on a
  2048-token row of ~200-token documents it is ~7× faster than a dense masked SDPA (ENVIRONMENT.md).
- ``sdpa_grouped``: segments sorted by length and batched into groups of similar length (each at least
  half the group's longest), one causal SDPA per group over segments right-padded to that length — causal
  attention never lets a real token see the padding after it. O(Σ len²) up to a factor < 4 per segment,
  but a handful of kernel calls instead of one per document: the CPU default, much faster than
  ``sdpa_segments`` on many short documents.
- ``dense``: one SDPA per row with a block-diagonal causal mask: O(S²) whatever the documents; kept as
  the reference the other two are tested against.
Mistral's sliding window (token i sees j when i − j < window) is honoured by every backend.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F

log = logging.getLogger("witscale")
BACKENDS = ("auto", "flash_varlen", "sdpa_grouped", "sdpa_segments", "dense")
_announced: set[str] = set()


def _flash_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def select_backend(requested: str = "auto", device: Optional[torch.device] = None,
                   dtype: Optional[torch.dtype] = None) -> str:
    if requested not in BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r} (known: {', '.join(BACKENDS)})")
    backend = requested
    if requested == "auto":
        on_cuda = device is not None and device.type == "cuda"
        half = dtype is None or dtype in (torch.float16, torch.bfloat16)    # flash-attn has no fp32 kernels
        backend = "flash_varlen" if on_cuda and half and _flash_available() else "sdpa_grouped"
    if backend == "flash_varlen" and not _flash_available():
        raise ValueError("attention backend flash_varlen needs CUDA and the flash-attn package")
    if backend not in _announced:
        _announced.add(backend)
        log.info(f"packed attention backend: {backend}")
    return backend


def _window_mask(length: int, window: int, device) -> torch.Tensor:
    i = torch.arange(length, device=device)
    d = i[:, None] - i[None, :]
    return (d >= 0) & (d < window)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, *, backend: str, sliding_window: Optional[int] = None) -> torch.Tensor:
    """q [B, S, Hq, D], k/v [B, S, Hkv, D] → [B, S, Hq, D]; causal within each segment of cu_seqlens."""
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    if backend == "flash_varlen":
        from flash_attn import flash_attn_varlen_func

        window = (sliding_window - 1, 0) if sliding_window else (-1, -1)
        out = flash_attn_varlen_func(q.reshape(b * s, hq, d), k.reshape(b * s, hkv, d), v.reshape(b * s, hkv, d),
                                     cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True,
                                     window_size=window)
        return out.reshape(b, s, hq, d)
    if hkv != hq:                       # grouped-query attention: each kv head serves hq/hkv query heads
        k = k.repeat_interleave(hq // hkv, dim=2)
        v = v.repeat_interleave(hq // hkv, dim=2)
    if backend == "dense":
        return _dense(q, k, v, cu_seqlens, sliding_window)
    if backend == "sdpa_grouped" and not (sliding_window and max_seqlen > sliding_window):
        return _grouped(q, k, v, _checked_bounds(cu_seqlens, b * s))
    qf, kf, vf = (t.reshape(b * s, hq, d).transpose(0, 1) for t in (q, k, v))   # [H, B*S, D]
    out = torch.empty_like(qf)
    bounds = _checked_bounds(cu_seqlens, b * s)
    for start, end in zip(bounds[:-1], bounds[1:]):
        length = end - start
        if length == 0:
            continue
        qs, ks, vs = qf[:, start:end], kf[:, start:end], vf[:, start:end]
        if sliding_window and length > sliding_window:
            mask = _window_mask(length, sliding_window, q.device)
            out[:, start:end] = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask)
        else:
            out[:, start:end] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
    return out.transpose(0, 1).reshape(b, s, hq, d)


def _checked_bounds(cu_seqlens: torch.Tensor, total: int) -> list[int]:
    """cu_seqlens as a list, after checking it partitions the ``total`` flattened tokens."""
    bounds = cu_seqlens.tolist()
    if cu_seqlens.dim() != 1 or len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != total or any(
            a > b for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to the {total} flattened tokens, got {bounds[:8]}"
                         + ("…" if len(bounds) > 8 else ""))
    return bounds


def _grouped(q, k, v, bounds: list[int], min_fraction: float = 0.5) -> torch.Tensor:
    b, s, h, d = q.shape
    n = b * s
    # One zero row at index n: the gather target of every padding slot.
    qf, kf, vf = (torch.cat([t.reshape(n, h, d), t.new_zeros(1, h, d)]) for t in (q, k, v))
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
        out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True).transpose(1, 2)   # [G, L, H, D]
        real = idx < n
        positions.append(idx[real])
        values.append(out[real])
    merged = torch.zeros(n, h, d, dtype=q.dtype, device=q.device).index_copy(
        0, torch.cat(positions), torch.cat(values))
    return merged.reshape(b, s, h, d)


def _dense(q, k, v, cu_seqlens, sliding_window):
    b, s, h, d = q.shape
    bounds = _checked_bounds(cu_seqlens, b * s)
    row_ends = set(range(0, b * s + 1, s))
    if any(x not in set(bounds) for x in row_ends):
        # A row-local mask cannot express attention across rows; the other backends could, but
        # the packer never produces such segments, so this is a caller's error.
        raise ValueError("dense attention: every row boundary must also be a cu_seqlens boundary")
    seg = torch.zeros(b * s, dtype=torch.long, device=q.device)
    seg[cu_seqlens[1:-1].long()] = 1
    seg = seg.cumsum(0).reshape(b, s)                       # segment id of every token
    same = seg[:, :, None] == seg[:, None, :]
    mask = same & torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    if sliding_window:
        mask &= _window_mask(s, sliding_window, q.device)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask[:, None])
    return out.transpose(1, 2)
