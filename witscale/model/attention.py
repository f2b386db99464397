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
  Without ``enable_gqa`` K/V are repeated to the query heads, unless a probe, once per device and dtype,
  showed un-repeated K/V give the same result (``varlen_takes_grouped_kv``); without ``window_size``, a layer whose
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
- ``flex``: ``torch.nn.attention.flex_attention`` (compiled on CUDA) with a block mask for documents +
  causal + window built on the device from cu_seqlens (no host sync; built once per ``cu_seqlens`` tensor
  and window, and reused by every layer with that window: ``BlockMaskCache``) and the soft-cap as its
  ``score_mod``. The CUDA backend for soft-capped
  attention when flash-attn is not installed (any dtype). CUDA only: on the CPU, torch 2.13's
  flex_attention runs forward (tested there against ``dense``) but has no backward.
- ``eager``: the explicit-scores path (scores = q·kᵀ·scale, capped, masked, softmax in fp32, then ·v;
  transformers' Gemma-2 "eager" attention), over the same length groups as ``sdpa_grouped``. The CPU
  backend for soft-capped attention; memory [group × H × L × L] per group, so a CPU/testing path.

Scale: ``scale`` is the softmax scale (default 1/√head_dim; Gemma: ``query_pre_attn_scalar ** -0.5``).
Every backend honours it: SDPA's and flex's ``scale``, flash-attn's ``softmax_scale``, varlen_attn's
``scale`` where its signature has it (torch ≥ 2.11) and otherwise q pre-multiplied by scale·√head_dim.

Soft-capping (Gemma-2 ``attn_logit_softcapping``): scores → c·tanh(scores / c) after scaling, before the
mask and softmax. SDPA and varlen_attn cannot apply it, so the backends that can are ``flash_varlen``
(flash-attn ≥ 2.6's ``softcap``), ``flex``, ``eager`` and ``dense`` (which then computes its scores
explicitly). ``select_backend(..., softcap=c)`` picks one automatically — CPU: ``eager``; CUDA:
``flash_varlen`` when installed (fp16/bf16, Ampere+), else ``flex``, else ``dense`` — and logs why; an
explicitly requested backend that cannot cap, or ``packed_attention`` handed one with a cap, raises a
ValueError: a cap is never dropped silently.

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
import math
import weakref
from typing import Optional

import torch
import torch.nn.functional as F

try:
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:                                     # torch < 2.10
    _varlen_attn = None

log = logging.getLogger("witscale")
BACKENDS = ("auto", "varlen", "flash_varlen", "flex", "sdpa_grouped", "sdpa_segments", "eager", "dense")
# The backends that apply attention soft-capping (flash_varlen only with a flash-attn that has ``softcap``).
SOFTCAP_BACKENDS = ("flash_varlen", "flex", "eager", "dense")
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
def _flash_has_softcap() -> bool:
    """Whether the installed flash-attn's varlen function takes ``softcap`` (flash-attn ≥ 2.6)."""
    from flash_attn import flash_attn_varlen_func
    return "softcap" in inspect.signature(flash_attn_varlen_func).parameters


def _flex_unusable(device: Optional[torch.device]) -> Optional[str]:
    """Why the ``flex`` backend cannot train on this device, or None when it can."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
    if device is None or torch.device(device).type != "cuda":
        return f"flex_attention has no backward on {device} (CUDA only)"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    return None


def checked_softcap(softcap: Optional[float]) -> Optional[float]:
    """A positive float, or None for no cap (HF configs write None or 0 for "off")."""
    if softcap is None or softcap == 0:
        return None
    if not softcap > 0:                                 # also rejects NaN
        raise ValueError(f"attention softcap must be a positive number (or None/0 for no cap), got {softcap!r}")
    return float(softcap)


def check_backend_name(requested: str) -> None:
    """ValueError (one line) unless ``requested`` is one of BACKENDS: the one check of a backend's name."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r} (known: {', '.join(BACKENDS)})")


def check_backend_request(requested: str, softcap: Optional[float]) -> None:
    """The up-front part of select_backend, for the command lines (before any process group or model exists):
    ValueError (one line) for an unknown backend, or one that cannot apply the model's attention soft-cap.
    What depends on the device (CUDA, flash-attn, flex) is still checked by select_backend."""
    check_backend_name(requested)
    if checked_softcap(softcap) is not None and requested not in ("auto", *SOFTCAP_BACKENDS):
        raise ValueError(f"attention backend {requested} cannot apply the model's attention soft-capping "
                         f"(attn_logit_softcapping {softcap:g}); use one of auto, {', '.join(SOFTCAP_BACKENDS)}")

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
                   dtype: Optional[torch.dtype] = None, softcap: Optional[float] = None) -> str:
    """The backend to run: ``requested``, or for "auto" the fastest that runs on ``device``/``dtype`` and
    applies ``softcap`` (see the module docstring); logged once per choice. Raises ValueError for a requested
    backend that cannot run here or cannot apply the cap."""
    check_backend_name(requested)
    if checked_softcap(softcap) is not None:
        return _select_capping(requested, device, dtype)
    backend, why = requested, ""
    if requested == "auto":
        if device is None or torch.device(device).type != "cuda":
            backend = "sdpa_grouped"
        else:
            why = _varlen_unusable(device, dtype)
            if why is None:
                backend = "varlen"
            elif _flash_usable(device, dtype):
                backend = "flash_varlen"
            else:
                backend = "dense"
    elif backend == "varlen":
        why = _varlen_unusable(device, dtype)
        if why:
            raise ValueError(f"attention backend varlen cannot run here: {why}")
    if backend == "flash_varlen" and not _flash_available():
        raise ValueError("attention backend flash_varlen needs CUDA and the flash-attn package")
    if backend == "flex" and _flex_unusable(device):
        raise ValueError(f"attention backend flex cannot run here: {_flex_unusable(device)}")
    _announce(backend, f"packed attention backend: {backend}" + (f" (not varlen: {why})" if why else ""))
    return backend


def _flash_usable(device, dtype) -> bool:
    return (_flash_available() and (dtype is None or dtype in _HALF)
            and tuple(torch.cuda.get_device_capability(device)) >= (8, 0))   # FA2 needs Ampere+


def _select_capping(requested: str, device, dtype) -> str:
    """select_backend for soft-capped attention: only SOFTCAP_BACKENDS, never a silently dropped cap."""
    on_cuda = device is not None and torch.device(device).type == "cuda"
    if requested == "auto":
        if not on_cuda:
            backend, why = "eager", "SDPA cannot soft-cap"
        elif _flash_usable(device, dtype) and _flash_has_softcap():
            backend, why = "flash_varlen", "flash-attn's softcap"
        elif _flex_unusable(device) is None:
            backend, why = "flex", "varlen_attn cannot soft-cap"
        else:
            backend, why = "dense", f"varlen_attn cannot soft-cap, no flash-attn, flex: {_flex_unusable(device)}"
    else:
        backend, why = requested, "as requested"
        if backend not in SOFTCAP_BACKENDS:
            raise ValueError(f"attention backend {backend} cannot apply attention soft-capping "
                             f"(attn_logit_softcapping); use one of auto, {', '.join(SOFTCAP_BACKENDS)}")
        if backend == "flash_varlen" and not (_flash_available() and _flash_has_softcap()):
            raise ValueError("attention backend flash_varlen with soft-capping needs CUDA and flash-attn ≥ 2.6 "
                             "(its softcap argument)")
        if backend == "flex" and _flex_unusable(device):
            raise ValueError(f"attention backend flex cannot run here: {_flex_unusable(device)}")
    _announce(f"{backend}+softcap", f"packed attention backend for soft-capped layers: {backend} ({why})")
    return backend


def _window_mask(length: int, window: Optional[int], device) -> torch.Tensor:
    """[L, L] causal mask, limited to the last ``window`` keys when given (key j visible from i: 0 ≤ i−j < W)."""
    i = torch.arange(length, device=device)
    d = i[:, None] - i[None, :]
    return (d >= 0) & (d < window) if window else d >= 0


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
                     max_seqlen: int, *, backend: str, sliding_window: Optional[int] = None,
                     scale: Optional[float] = None, softcap: Optional[float] = None) -> torch.Tensor:
    """q [B, S, Hq, D], k/v [B, S, Hkv, D] → [B, S, Hq, D]; causal within each segment of cu_seqlens.

    ``scale``: the softmax scale (None: 1/√D); ``softcap``: scores → c·tanh(scores / c) (None/0: off), which
    only SOFTCAP_BACKENDS apply: pick the backend with ``select_backend(..., softcap=softcap)``."""
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} key/value heads")
    softcap = checked_softcap(softcap)
    if softcap is not None and backend not in SOFTCAP_BACKENDS:
        raise ValueError(f"attention backend {backend} cannot apply attention soft-capping (softcap={softcap}); "
                         f"choose the backend with select_backend(..., softcap=...)")
    # A window can only bite on a segment longer than it; max_seqlen bounds every segment.
    window_bites = bool(sliding_window) and max_seqlen > sliding_window
    if backend == "varlen":
        if _varlen_attn is None:
            raise ValueError(f"attention backend varlen cannot run here: {_varlen_unusable(q.device, q.dtype)}")
        if not (window_bites and "window_size" not in _varlen_params(_varlen_attn)):
            return _varlen(q, k, v, cu_seqlens, max_seqlen, sliding_window if window_bites else None, scale)
        # torch 2.10: varlen_attn cannot do a sliding window; never drop the window silently.
        backend = "flash_varlen" if _flash_available() else "dense"
        _announce("varlen-window", f"packed attention: this torch's varlen_attn has no window_size; "
                                   f"sliding-window attention uses {backend}")
    if backend == "flash_varlen":
        from flash_attn import flash_attn_varlen_func

        window = (sliding_window - 1, 0) if sliding_window else (-1, -1)
        kwargs = {"softcap": softcap} if softcap is not None else {}     # older flash-attn has no softcap
        out = flash_attn_varlen_func(q.reshape(b * s, hq, d), k.reshape(b * s, hkv, d), v.reshape(b * s, hkv, d),
                                     cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True,
                                     window_size=window, softmax_scale=scale, **kwargs)
        return out.reshape(b, s, hq, d)
    if backend == "flex":
        return _flex(q, k, v, cu_seqlens, sliding_window, scale, softcap)
    if backend == "dense":
        return _dense(q, k, v, cu_seqlens, sliding_window, scale, softcap)
    if backend == "eager":
        bounds = _checked_bounds(cu_seqlens, b * s)
        masks: dict[int, torch.Tensor] = {}

        def attend(qg, kg, vg):
            length = qg.shape[-2]
            if length not in masks:
                masks[length] = _window_mask(length, sliding_window, q.device)
            return _explicit(qg, kg, vg, masks[length], scale, softcap)
        return _grouped(q, k, v, bounds, attend)
    if backend == "sdpa_grouped" and not window_bites:
        return _grouped(q, k, v, _checked_bounds(cu_seqlens, b * s),
                        lambda qg, kg, vg: _sdpa(qg, kg, vg, is_causal=True, scale=scale))
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
            out[:, start:end] = _sdpa(qs, ks, vs, attn_mask=_window_mask(length, sliding_window, q.device),
                                      scale=scale)
        else:
            out[:, start:end] = _sdpa(qs, ks, vs, is_causal=True, scale=scale)
    return out.transpose(0, 1).reshape(b, s, hq, d)


def _varlen(q, k, v, cu_seqlens, max_seqlen: int, window: Optional[int], scale: Optional[float]) -> torch.Tensor:
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
    if scale is not None:
        if "scale" in params:                         # torch ≥ 2.11
            kwargs["scale"] = scale
        else:                                         # 2.10: its scale is 1/√D, so q·(scale·√D) gives ours
            qf = qf * (scale * math.sqrt(d))
    if hkv != hq:
        if "enable_gqa" in params:                    # torch ≥ 2.12
            kwargs["enable_gqa"] = True
        elif not varlen_takes_grouped_kv(q.device, q.dtype)["grouped"]:
            kf, vf = kf.repeat_interleave(hq // hkv, dim=1), vf.repeat_interleave(hq // hkv, dim=1)
    if "is_causal" in params and not window:          # 2.10 (is_causal is its only causal mode)
        kwargs["is_causal"] = True
    else:
        # A tuple, not a list: varlen_attn tests ``window_size == (-1, 0)`` to pick its causal path.
        kwargs["window_size"] = (window - 1, 0) if window else (-1, 0)
    out = _varlen_attn(qf, kf, vf, cu, cu, max_seqlen, max_seqlen, **kwargs)
    return out.reshape(b, s, hq, d)


_GROUPED_KV_PROBES: dict = {}


def varlen_takes_grouped_kv(device, dtype) -> dict:
    """Whether this torch's varlen_attn, without ``enable_gqa`` (2.10, 2.11), computes grouped-query attention
    from un-repeated K/V: FlashAttention's varlen kernel needs only Hq % Hkv == 0, but torch's wrapper may check
    the heads, or route the call to a kernel that needs them equal (2.11's cuDNN path). Repeating K/V costs a
    copy of each layer's K and V at Hq heads, forward and backward. So it is probed, not assumed: once per
    device and dtype, on a small problem, un-repeated against repeated — the output must be bitwise equal, the
    gradients equal up to the summation order of the K/V gradient over each group (a few units of rounding);
    any error, or any other difference, answers no. ``{"grouped": bool, "why": str}``; with ``enable_gqa`` in
    the signature the question does not arise (``grouped`` False: that path is taken before asking)."""
    key = (_varlen_attn, str(torch.device(device)), dtype)
    if key not in _GROUPED_KV_PROBES:
        found = _GROUPED_KV_PROBES[key] = _probe_grouped_kv(_varlen_attn, torch.device(device), dtype)
        _announce(f"varlen-gqa-{key[1:]}", f"varlen_attn with un-repeated K/V on {key[1]} {dtype}: "
                                           f"{'used' if found['grouped'] else 'not used'} ({found['why']})")
    return _GROUPED_KV_PROBES[key]


def _probe_grouped_kv(fn, device: torch.device, dtype: torch.dtype) -> dict:
    if fn is None:
        return {"grouped": False, "why": "no varlen_attn"}
    params = _varlen_params(fn)
    if "enable_gqa" in params:
        return {"grouped": False, "why": "this torch has enable_gqa"}
    lengths, hq, hkv, d = [5, 17, 1, 41], 4, 2, 64
    gen = torch.Generator().manual_seed(0)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    total, longest = sum(lengths), max(lengths)
    q, k, v = (torch.randn(total, h, d, generator=gen).to(device=device, dtype=dtype) for h in (hq, hkv, hkv))
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}

    def run(repeat: bool):
        qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        kr, vr = (kk.repeat_interleave(hq // hkv, dim=1), vv.repeat_interleave(hq // hkv, dim=1)) if repeat \
            else (kk, vv)
        out = fn(qq, kr, vr, cu, cu, longest, longest, **causal)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.ones_like(out))
        return out.detach(), qq.grad, kk.grad, vv.grad

    try:
        with torch.inference_mode(False), torch.enable_grad():      # the first call may come from an evaluation
            want = run(repeat=True)
    except Exception as e:       # noqa: BLE001 - the repeated call is the backend's own business, not the probe's
        return {"grouped": False, "why": f"the repeated call failed: {type(e).__name__}: {e}"}
    try:
        with torch.inference_mode(False), torch.enable_grad():
            got = run(repeat=False)
    except Exception as e:       # noqa: BLE001 - any refusal of un-repeated K/V answers no
        return {"grouped": False, "why": f"un-repeated K/V refused: {type(e).__name__}: {str(e)[:200]}"}
    if not torch.equal(got[0], want[0]):
        return {"grouped": False, "why": f"output differs (max {float((got[0] - want[0]).abs().max()):.3g})"}
    eps = torch.finfo(dtype).eps
    for name, g, w in zip(("q", "k", "v"), got[1:], want[1:]):
        if g is None or g.shape != w.shape:
            return {"grouped": False, "why": f"no gradient of {name} of its shape"}
        tolerance = 4 * eps * (hq // hkv) * float(w.abs().max().clamp_min(1.0))
        err = float((g.float() - w.float()).abs().max())
        if not err <= tolerance:
            return {"grouped": False, "why": f"gradient of {name} differs by {err:.3g} (> {tolerance:.3g})"}
    return {"grouped": True, "why": "output bitwise equal, gradients within rounding"}


def _checked_bounds(cu_seqlens: torch.Tensor, total: int) -> list[int]:
    """cu_seqlens as a list, after checking it partitions the ``total`` flattened tokens."""
    bounds = cu_seqlens.tolist()
    if cu_seqlens.dim() != 1 or len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != total or any(
            a > b for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to the {total} flattened tokens, got {bounds[:8]}"
                         + ("…" if len(bounds) > 8 else ""))
    return bounds


def _grouped(q, k, v, bounds: list[int], attend, min_fraction: float = 0.5) -> torch.Tensor:
    """Segments sorted by length, batched into groups of similar length and right-padded to the group's
    longest; ``attend(qg, kg, vg)`` ([G, H, L, D] each) runs causal attention on one group."""
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
        out = attend(qg, kg, vg).transpose(1, 2)                              # [G, L, Hq, D]
        real = idx < n
        positions.append(idx[real])
        values.append(out[real])
    merged = torch.zeros(n, hq, d, dtype=q.dtype, device=q.device).index_copy(
        0, torch.cat(positions), torch.cat(values))
    return merged.reshape(b, s, hq, d)


def _explicit(q, k, v, mask, scale: Optional[float], softcap: Optional[float]) -> torch.Tensor:
    """Attention with explicit scores, as transformers' Gemma-2 eager attention: q [..., Hq, L, D], k/v
    [..., Hkv, L, D], ``mask`` (True = visible) broadcastable to [..., L, L]. Scores, cap and softmax in fp32
    (fp64 for fp64 inputs) — HF rounds q·kᵀ to bf16 first, which on scores of ~20 moves probabilities by
    ~5%; the probabilities are rounded to v's dtype for the last matmul, as in every fused kernel. GQA by
    broadcasting K/V over each KV head's group of query heads (no repeated copy)."""
    *lead, hq, length, d = q.shape
    hkv = k.shape[-3]
    acc = torch.promote_types(q.dtype, torch.float32)
    qg = q.reshape(*lead, hkv, hq // hkv, length, d).to(acc)
    scores = torch.matmul(qg, k.unsqueeze(-3).transpose(-1, -2).to(acc))        # [..., Hkv, rep, L, L]
    scores = scores * (d ** -0.5 if scale is None else scale)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    mask = mask.reshape(mask.shape[:-2] + (1,) * (scores.dim() - mask.dim()) + mask.shape[-2:]) \
        if mask.dim() > 2 else mask                                              # [B, 1, L, L] → [B, 1, 1, L, L]
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v.unsqueeze(-3)).reshape(*lead, hq, length, d)


def _segment_ids(cu_seqlens: torch.Tensor, b: int, s: int, device) -> torch.Tensor:
    """[B, S] segment id of every token, from cu_seqlens on the device (no host sync)."""
    cu = cu_seqlens.to(device)
    token = torch.arange(b * s, device=device, dtype=cu.dtype)
    return torch.searchsorted(cu, token, right=True).view(b, s)


def _dense(q, k, v, cu_seqlens, sliding_window, scale: Optional[float] = None, softcap: Optional[float] = None):
    """Block-diagonal causal (+window) mask from cu_seqlens, built on q's device with no host sync; with a
    soft-cap the scores are computed explicitly (``_explicit``), otherwise by SDPA."""
    b, s, _, _ = q.shape
    if cu_seqlens.device.type == "cpu":               # host data: checking it costs no device sync
        bounds = set(_checked_bounds(cu_seqlens, b * s))
        if any(x not in bounds for x in range(0, b * s + 1, s)):
            # A row-local mask cannot express attention across rows; the other backends could, but
            # the packer never produces such segments, so this is a caller's error. (Unchecked on the
            # device: there such a segment is silently cut at the row boundary.)
            raise ValueError("dense attention: every row boundary must also be a cu_seqlens boundary")
    seg = _segment_ids(cu_seqlens, b, s, q.device)
    mask = (seg[:, :, None] == seg[:, None, :]) & _window_mask(s, sliding_window, q.device)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if softcap is not None:
        out = _explicit(qt, kt, vt, mask[:, None], scale, softcap)
    else:
        out = _sdpa(qt, kt, vt, attn_mask=mask[:, None], scale=scale)
    return out.transpose(1, 2)


# ---- flex_attention ------------------------------------------------------------------------------------

class BlockMaskCache:
    """flex's BlockMasks for the current ``cu_seqlens`` tensor: one per (rows, row length, window, device),
    built by ``build(cu_seqlens, b, s, window, device)`` on the first request and reused after. Every layer
    of a forward (and its checkpointed recompute) passes the same cu_seqlens tensor, so a model whose layers
    alternate windows (Gemma-2: sliding, full, sliding, …) builds one mask per distinct window, not one per
    layer. The soft-cap is flex's score_mod, not part of the mask, so it is not part of the key. All entries
    are dropped when another cu_seqlens tensor comes, or the same one modified in place: the tensor is held
    by a weak reference and its version counter, so a freed or changed tensor never matches."""

    def __init__(self, build):
        self.build = build
        self.masks: dict = {}
        self._ref = None
        self._version = None

    def get(self, cu_seqlens: torch.Tensor, b: int, s: int, window: Optional[int], device):
        if self._ref is None or self._ref() is not cu_seqlens or self._version != cu_seqlens._version:
            self.clear()
            self._ref, self._version = weakref.ref(cu_seqlens), cu_seqlens._version
        key = (b, s, window or None, str(device))
        mask = self.masks.get(key)
        if mask is None:
            mask = self.masks[key] = self.build(cu_seqlens, b, s, window, device)
        return mask

    def clear(self):
        self.masks.clear()
        self._ref = self._version = None


def _build_flex_block_mask(cu_seqlens: torch.Tensor, b: int, s: int, window: Optional[int], device):
    """The documents + causal (+ window) BlockMask, built on the device from cu_seqlens (no host sync)."""
    from torch.nn.attention.flex_attention import create_block_mask

    seg = _segment_ids(cu_seqlens, b, s, device)

    def visible(batch, head, q_idx, kv_idx):
        ok = (seg[batch, q_idx] == seg[batch, kv_idx]) & (q_idx >= kv_idx)
        return ok & (q_idx - kv_idx < window) if window else ok

    # Compiled on CUDA: the eager build materializes a [B, S, S] mask. torch.compile(create_block_mask), not
    # create_block_mask(_compile=True): that flag is deprecated since torch 2.11 (and does just this).
    build = _compiled_create_block_mask() if torch.device(device).type == "cuda" else create_block_mask
    return build(visible, b, None, s, s, device=device)


@functools.lru_cache(maxsize=None)
def _compiled_create_block_mask():
    from torch.nn.attention.flex_attention import create_block_mask
    return torch.compile(create_block_mask)


_block_mask_cache = BlockMaskCache(_build_flex_block_mask)


@functools.lru_cache(maxsize=None)
def _softcap_score_mod(softcap: float):
    """One score_mod function per cap value: a new closure per call would make torch.compile recompile."""
    def capped(score, batch, head, q_idx, kv_idx):
        return torch.tanh(score / softcap) * softcap
    return capped


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention)


def _flex(q, k, v, cu_seqlens, sliding_window, scale: Optional[float], softcap: Optional[float]):
    """flex_attention over [B, H, S, D] with the document block mask; compiled on CUDA (uncompiled it is a
    slow reference that materializes the scores, and on the CPU forward-only)."""
    from torch.nn.attention.flex_attention import flex_attention

    b, s, hq, _ = q.shape
    block_mask = _block_mask_cache.get(cu_seqlens, b, s, sliding_window, q.device)
    fn = _compiled_flex() if q.is_cuda else flex_attention
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
             score_mod=_softcap_score_mod(softcap) if softcap is not None else None,
             block_mask=block_mask, scale=scale, enable_gqa=k.shape[2] != hq)
    return out.transpose(1, 2)
