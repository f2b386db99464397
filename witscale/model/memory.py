"""Activation memory for long rows: what ``--activation-checkpointing offload`` and ``--tiled-mlp N`` change in the
decoder (witscale/model/transformer.py calls these two; docs/parallel-layout.md#activation-memory).

``BlockInputOffload`` — offloaded activation checkpointing. With checkpointing on, each decoder block keeps only
its input hidden state [B, S, H] for backward and recomputes the rest; at long rows those L inputs are what is
left on the GPU. Offload moves them to host memory (pinned where CUDA is available, so the copies are
asynchronous; plain CPU tensors on the CPU) and brings each back when backward recomputes its block.

Why saved-tensor hooks around torch's non-reentrant checkpoint, and not ``torch.autograd.graph.save_on_cpu`` or
DeepSpeed's ``cpu_checkpointing``: the non-reentrant checkpoint (what ``on`` already uses) keeps its inputs as
saved tensors (``_CheckpointFrame.save_inputs``), packed by the hooks around the call, and everything inside the
block by its own hooks (holders, nothing kept). So hooks around ``checkpoint(...)`` see exactly the block's
inputs: ``on`` and ``offload`` run the same recomputation and differ only in where the input waits.
``save_on_cpu`` would also copy the RoPE tables and ``cu_seqlens`` (shared by every block, already resident)
and copies back only when backward needs the tensor; DeepSpeed's ``cpu_checkpointing`` belongs to its own
(reentrant) checkpoint API with activation partitioning, which witscale's blocks do not use. Here only
tensors that require grad (the hidden state) move; the rest is kept by reference, and on CUDA the input of the
block before is prefetched on a side stream while backward runs this one.

``tiled_mlp`` — the gated MLP over sequence tiles, with DeepSpeed's ``TiledMLP`` (ALST,
deepspeed/runtime/sequence_parallel/ulysses_sp.py): forward runs the tiles without saving anything but the
MLP's input; backward recomputes and differentiates one tile at a time, so the [T, I] intermediates (gate,
up, activation, product) exist for one tile only. It fits witscale's MLP as it is: it calls the module
(``MLP.__call__``), so the TP layers' communication (copy_to_tp's all-reduce of dL/dx, the row-parallel
all-reduce) runs per tile on every rank alike, and ZeRO-3's module hooks gather the parameters for each
call, the recomputation in backward included; it marks the parameters ``ds_grad_is_ready`` only on the
last tile, so ZeRO-1/2/3 reduce each gradient once, summed over the tiles.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

ACTIVATION_CHECKPOINTING_MODES = ("off", "on", "offload")


def checkpointing_mode(value) -> str:
    """'off' / 'on' / 'offload' from a bool (the older API: True is 'on') or one of those names."""
    if value is True or value is False or value is None:
        return "on" if value else "off"
    if value not in ACTIVATION_CHECKPOINTING_MODES:
        raise ValueError(f"activation checkpointing {value!r}: expected one of {', '.join(ACTIVATION_CHECKPOINTING_MODES)}")
    return value


def host_copy(t: torch.Tensor) -> torch.Tensor:
    """A host copy of ``t``: pinned where CUDA is available (so both copies can be asynchronous), plain on the
    CPU. The one place the offload allocates host memory (memory_probe counts it apart from device memory)."""
    host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=torch.cuda.is_available())
    host.copy_(t, non_blocking=t.is_cuda)
    return host


class _Offloaded:
    __slots__ = ("index", "host", "device")

    def __init__(self, index: int, host: torch.Tensor, device: torch.device):
        self.index, self.host, self.device = index, host, device


class BlockInputOffload(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks for one forward of the decoder: enter around each block's ``checkpoint(...)`` call.
    Tensors that require grad (the block's hidden-state input) go to host memory; others (RoPE tables,
    ``cu_seqlens``) are kept by reference. ``host_bytes``: what this forward moved to the host."""

    def __init__(self):
        self.host_bytes = 0
        self._blocks: list[_Offloaded] = []          # in forward order: backward unpacks them in reverse
        self._prefetched: dict[int, tuple[torch.Tensor, torch.cuda.Event]] = {}
        self._stream: Optional[torch.cuda.Stream] = None
        super().__init__(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor):
        if not (t.requires_grad and t.is_floating_point()):
            return t
        packed = _Offloaded(len(self._blocks), host_copy(t), t.device)
        self._blocks.append(packed)
        self.host_bytes += t.numel() * t.element_size()
        return packed

    def _unpack(self, packed):
        if not isinstance(packed, _Offloaded):
            return packed
        ready = self._prefetched.pop(packed.index, None)
        if ready is not None:
            t, event = ready
            stream = torch.cuda.current_stream(packed.device)
            stream.wait_event(event)
            t.record_stream(stream)      # allocated on the copy stream, used on this one
        else:
            t = packed.host.to(packed.device, non_blocking=packed.host.is_pinned())
        if packed.index > 0 and packed.device.type == "cuda":
            self._prefetch(self._blocks[packed.index - 1])
        return t

    def _prefetch(self, packed: _Offloaded) -> None:
        """Start copying the previous block's input back on a side stream: it arrives while backward runs
        this block (its recomputation and gradients) instead of stalling the next one."""
        if packed.index in self._prefetched:
            return
        if self._stream is None:
            self._stream = torch.cuda.Stream(packed.device)
        compute = torch.cuda.current_stream(packed.device)
        self._stream.wait_stream(compute)        # the forward's device-to-host copy was queued on compute
        with torch.cuda.stream(self._stream):
            t = packed.host.to(packed.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        self._prefetched[packed.index] = (t, event)


def tile_count(tokens: int, tiles: int) -> int:
    """How many tiles ``torch.chunk`` makes of ``tokens`` rows asked for ``tiles`` (ceil(T/N) rows each: fewer
    than N where N does not divide well, e.g. 12 rows in 7 → 6 tiles of 2)."""
    if tokens <= 0:
        return 1
    size = -(-tokens // tiles)
    return -(-tokens // size)


def tiled_mlp(mlp: nn.Module, x: torch.Tensor, tiles: int) -> torch.Tensor:
    """``mlp(x)`` over at most ``tiles`` sequence tiles (``tiles`` 1: the plain call). DeepSpeed's TiledMLP
    chunks [B, S, H] along S in forward and the flattened B·S tokens in backward, and clears
    ``ds_grad_is_ready`` on every tile but the one it counts as last (index ``shards`` - 1): ``shards`` is
    therefore the count ``torch.chunk`` really makes of the B·S tokens, or the last tile's gradients would
    never reach ZeRO's reduction."""
    if tiles <= 1 or not (torch.is_grad_enabled() and x.requires_grad):
        return mlp(x)       # nothing saved for backward to tile (TiledMLP's output needs grad through x)
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    shards = tile_count(x.numel() // x.shape[-1], tiles)
    if shards <= 1:
        return mlp(x)
    params = [p for p in mlp.parameters() if p.requires_grad]
    return TiledMLP.apply(_call_module, mlp, x, shards, params)


def _call_module(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # Through __call__: ZeRO-3's hooks gather the parameters for every tile. TiledMLP's backward passes flat
    # [tokens, H] tiles; the MLP's sequence collectives (--tp-sequence-parallel) take [B, S, H], so a flat tile
    # runs as one row (the MLP is per token, and every TP rank cuts its equal part into the same tiles).
    if x.dim() == 2:
        return module(x.unsqueeze(0)).squeeze(0)
    return module(x)


def set_tiled_mlp(module: nn.Module, tiles: int) -> int:
    """Run the MLP of every decoder block in ``module`` over ``tiles`` sequence tiles. Returns the block count."""
    from witscale.model.transformer import DecoderLayer
    if int(tiles) < 1:
        raise ValueError(f"tiled MLP: tiles must be at least 1, got {tiles}")
    blocks = [m for m in module.modules() if isinstance(m, DecoderLayer)]
    for block in blocks:
        block.mlp_tiles = int(tiles)
    return len(blocks)
