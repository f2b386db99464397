"""Measuring activation memory on the CPU, where torch's allocator keeps no statistics.

``LiveTensorPeak`` is a ``TorchDispatchMode`` that sees every aten op run inside it (autograd's backward
included) and counts the bytes of each storage an op allocates — an output whose storage is none of the
op's inputs' (a view or an in-place result shares its input's storage and costs nothing) — until that
storage is freed (a weak reference on it). ``peak`` is then the largest sum of live bytes allocated inside
the mode: what ``torch.cuda.max_memory_allocated`` reports on a GPU above what existed before (parameters,
inputs), exactly, without the caching allocator's rounding and fragmentation.

``measure_activation_peak`` runs one forward + backward of a witscale ``CausalLM`` on a micro-batch under
it, with each parameter's gradient dropped as soon as it is accumulated (what ZeRO-2/3 do once they have
reduce-scattered it; the planner counts gradients on their own), so the peak is the activations: what the
planner's ``activation_memory`` estimates (tests/test_planner_activations.py, tools/bench/bench_activations.py).

``flash_like_attention`` swaps the model's packed attention for torch's CPU flash-attention kernel over
rows that each hold one document: it saves q, k, v, the output and the logsumexp — what the varlen/flash
kernels save on a GPU, and what the planner assumes. witscale's CPU backends (``sdpa_grouped`` gathers
padded copies of q/k/v per group of documents; ``sdpa_segments`` and ``dense`` keep more) would measure a
CPU-only implementation detail instead.

``SavedTensorBytes`` counts what autograd itself holds for backward (saved-tensor hooks): the bytes of the
distinct storages saved and not yet released, and their peak — per decoder block and per MLP tile count in
tests/test_activation_memory_options.py and tools/bench/bench_activations.py. The host copies of
``--activation-checkpointing offload`` (witscale/model/memory.py ``host_copy``) are host memory, which the
GPU's allocator does not count: ``measure_activation_peak`` leaves them out of its device figures and
reports them as ``host_bytes``.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorPeak(TorchDispatchMode):
    """Bytes of storages allocated by ops inside the mode and still alive: ``now`` and its ``peak``."""

    def __init__(self):
        super().__init__()
        self.now = 0
        self.peak = 0
        self._live: dict[int, int] = {}            # storage address -> bytes
        self._refs: dict[int, weakref.ref] = {}

    def reset_peak(self) -> None:
        self.peak = self.now

    def _freed(self, address: int) -> None:
        self.now -= self._live.pop(address, 0)
        self._refs.pop(address, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            address, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or address in inputs or address in self._live:
                continue
            self._live[address] = size
            self.now += size
            self.peak = max(self.peak, self.now)
            self._refs[address] = weakref.ref(storage, lambda _ref, a=address: self._freed(a))
        return out


class _Saved:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class SavedTensorBytes(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks counting the bytes autograd holds for backward: ``now`` (distinct storages saved and
    not yet released by the graph) and ``peak``. Only what is saved while the hooks are the innermost ones is
    seen: a checkpointed block's inside is packed by the checkpoint's own hooks (nothing kept), its inputs by
    these — or by the offload's hooks (memory.py), which are inside."""

    def __init__(self):
        self.now = 0
        self.peak = 0
        self._holders: dict[int, int] = {}       # storage address -> how many saved tensors hold it
        super().__init__(self._pack, lambda saved: saved.tensor)

    def __enter__(self) -> "SavedTensorBytes":
        super().__enter__()
        return self

    def _pack(self, t: torch.Tensor) -> _Saved:
        saved = _Saved(t)
        storage = t.untyped_storage()
        address = storage.data_ptr()
        if self._holders.get(address, 0) == 0:
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
        self._holders[address] = self._holders.get(address, 0) + 1
        weakref.finalize(saved, self._released, address, storage.nbytes())
        return saved

    def _released(self, address: int, nbytes: int) -> None:
        self._holders[address] -= 1
        if self._holders[address] == 0:
            del self._holders[address]
            self.now -= nbytes


@contextlib.contextmanager
def host_copies_outside(mode: TorchDispatchMode, on_copy: Callable[[torch.Tensor], None] = lambda host: None):
    """Inside, the offload's host copies (memory.py ``host_copy``) are made outside ``mode``: host memory is not
    what the device allocator counts. ``on_copy`` sees each copy."""
    from torch.utils._python_dispatch import _disable_current_modes
    import witscale.model.memory as memory

    original = memory.host_copy

    def uncounted(t):
        with _disable_current_modes():
            host = original(t)
        on_copy(host)
        return host
    memory.host_copy = uncounted
    try:
        yield
    finally:
        memory.host_copy = original


def _one_document_per_row_attention(q, k, v, cu_seqlens, max_seqlen, *, backend, sliding_window=None, scale=None,
                                    **options):
    b, s = q.shape[:2]
    if cu_seqlens.tolist() != list(range(0, b * s + 1, s)) or sliding_window or any(
            x is not None for x in options.values()):
        raise ValueError("flash_like_attention: every row must be one document (cu_seqlens at row boundaries), "
                         f"with no sliding window or other option ({options})")
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)      # the CPU kernel writes [B, S, H, D] memory: the reshape after is a view


@contextlib.contextmanager
def flash_like_attention():
    """Inside, witscale's decoder attends with torch's CPU flash kernel, one document per row."""
    import witscale.model.transformer as transformer

    original = transformer.packed_attention
    transformer.packed_attention = _one_document_per_row_attention
    try:
        yield
    finally:
        transformer.packed_attention = original


def measure_activation_peak(module: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                            weights: torch.Tensor) -> dict[str, int]:
    """Peak bytes allocated by one forward + backward of ``module`` (a ``CausalLM``) on rows that are one
    document each, gradients dropped as accumulated: {"forward_peak", "peak"} (the latter over both),
    "held_after_forward" (device bytes still allocated when forward returns: what backward needs) and
    "host_bytes" (what --activation-checkpointing offload copied to host memory, not in the others). Under
    --sp (the module's ``sp_group``) the rows given are whole and each rank runs its 1/sp of them."""
    b, s = input_ids.shape
    position_ids = torch.arange(s).repeat(b, 1)
    cu_seqlens = torch.arange(0, b * s + 1, s, dtype=torch.int32)
    sp_group = getattr(module, "sp_group", None)
    if sp_group is not None:      # --sp: this rank's 1/sp of every row, as the trainer hands it over (whole cu_seqlens)
        from witscale.parallel.sequence import sequence_shard, sp_size_rank

        sp, sp_rank = sp_size_rank(sp_group)
        input_ids, position_ids, labels, weights = (sequence_shard(t, sp, sp_rank)
                                                    for t in (input_ids, position_ids, labels, weights))
    handles = [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
               for p in module.parameters() if p.requires_grad]
    module.train()
    try:
        host = []
        with flash_like_attention(), LiveTensorPeak() as mode, host_copies_outside(mode, host.append):
            stats = module(input_ids, position_ids, cu_seqlens, s, labels, weights)
            forward_peak, held = mode.peak, mode.now
            stats.weighted_sum.backward()
    finally:
        for h in handles:
            h.remove()
    return {"forward_peak": forward_peak, "peak": mode.peak, "held_after_forward": held,
            "host_bytes": sum(h.untyped_storage().nbytes() for h in host)}
