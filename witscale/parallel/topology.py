"""The parallel layout: world = pp × dp × sp × tp, validated before any process group exists.

Rank order is tp fastest, then sp, then dp, then pp (Megatron's order, and the one DeepSpeed's
``PipeModelDataParallelTopology`` uses, with sp inside dp): tensor-parallel peers are neighbouring ranks,
i.e. on the same node, where their per-layer all-reduces need the fastest links; a sequence-parallel group
(sp × tp consecutive ranks) stays inside a node too, for its all-to-alls (docs/parallel-layout.md#sequence-parallelism).

    rank = pp_rank * (dp * sp * tp) + dp_rank * (sp * tp) + sp_rank * tp + tp_rank

Sequence-parallel peers hold the same rows (each a contiguous 1/sp of every row): the loader's data-parallel
rank is ``dp_rank``; ZeRO partitions and gradients reduce over dp × sp (``get_sequence_data_parallel_group``,
the mpu method DeepSpeed asks for; see ``Topology``'s comment on why it gets no sequence-parallel size).

``ParallelDims`` is pure arithmetic (no torch.distributed), valid on construction, so that every layout error
is raised, with the numbers, before ``init_process_group``. ``Topology`` builds the groups and doubles as the ``mpu`` object
DeepSpeed expects (Megatron's method names).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch.distributed as dist


class LayoutError(ValueError):
    """A parallel layout that cannot work; raised before any process group is created."""


@dataclass(frozen=True)
class ParallelDims:
    """A layout of ``world_size`` ranks as pp × dp × sp × tp, valid by construction: every rule is checked in
    ``__post_init__`` (LayoutError with the numbers), for the ZeRO stage and — when given — the model
    (any object with the HF config fields: ModelConfig, ModelShape). The planner asks it too."""
    world_size: int
    tp: int = 1
    pp: int = 1
    zero_stage: int = 0
    model: Optional[object] = field(default=None, compare=False, repr=False)
    sp: int = 1
    gpus_per_node: Optional[int] = field(default=None, compare=False)    # when known: sp × tp fits in one node

    def __post_init__(self):
        w, tp, pp, sp = self.world_size, self.tp, self.pp, self.sp
        for name, value in (("world size", w), ("--tp", tp), ("--pp", pp), ("--sp", sp)):
            if value < 1:
                raise LayoutError(f"{name} must be >= 1, got {value}")
        if sp == 1 and w % (tp * pp):
            raise LayoutError(f"world size {w} is not divisible by tp × pp = {tp} × {pp} = {tp * pp}")
        if w % (tp * pp * sp):
            raise LayoutError(f"world size {w} is not divisible by tp × sp × pp = {tp} × {sp} × {pp} = {tp * sp * pp}")
        if sp > 1:
            self._check_sequence_parallel()
        if pp > 1 and self.zero_stage > 1:
            raise LayoutError(
                f"ZeRO stage {self.zero_stage} cannot be combined with pipeline parallelism (pp={pp}): DeepSpeed's "
                "pipeline engine supports ZeRO stage 0 or 1 only; use a zero1 config for tp × pp × dp layouts")
        if self.model is not None:
            self._check_model(self.model)

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp * self.sp)

    # What sp > 1 has been tested with (tests/test_sequence_parallel.py: ZeRO-0..3, × tp); the rest is refused.
    def _check_sequence_parallel(self) -> None:
        missing = []
        if self.pp > 1:
            missing.append(f"--pp {self.pp} (the pipeline stages do not pass the sequence-parallel group)")
        if self.gpus_per_node and self.sp * self.tp > self.gpus_per_node:
            # An sp group's all-to-alls (and tp's collectives) over the inter-node network: refused, not slow.
            raise LayoutError(f"--sp {self.sp} × --tp {self.tp} = {self.sp * self.tp} ranks exceed the "
                              f"{self.gpus_per_node} GPUs of a node: an sp × tp group must stay inside one node")
        if missing:
            raise LayoutError(f"--sp {self.sp} is not supported with " + "; ".join(missing))

    def _check_model(self, cfg) -> None:
        tp, pp = self.tp, self.pp
        checks = [
            ("attention heads", cfg.num_attention_heads, tp, "tp"),
            ("intermediate size", cfg.intermediate_size, tp, "tp"),
        ]
        for what, n, k, flag in checks:
            if n % k:
                raise LayoutError(f"--{flag} {k} does not divide the model's {what} ({n})")
        kv = cfg.num_key_value_heads
        if kv % tp and tp % kv:
            # Split (tp divides them) or replicated (tp a multiple: parallel/layers.py ReplicatedKVHeadLinear).
            raise LayoutError(f"--tp {tp} neither divides the model's key/value heads ({kv}) nor is a multiple of "
                              "them (with fewer KV heads than TP ranks, each is replicated on tp / kv_heads ranks)")
        if cfg.num_hidden_layers < pp:
            raise LayoutError(f"--pp {pp} exceeds the model's {cfg.num_hidden_layers} layers")
        if self.sp > 1:
            # Ulysses: the all-to-all gives each sp rank heads/sp of this TP rank's heads. KV heads per TP rank
            # (1 when TP replicates them) split the same way, or, fewer than sp, are replicated to sp
            # (witscale/parallel/sequence.py), as TP replicates them.
            local_q = cfg.num_attention_heads // tp
            local_kv = kv // tp if kv % tp == 0 else 1
            if local_q % self.sp:
                raise LayoutError(f"--sp {self.sp} does not divide the model's attention heads per TP rank "
                                  f"({cfg.num_attention_heads} / tp {tp} = {local_q})")
            if local_kv % self.sp and self.sp % local_kv:
                raise LayoutError(f"--sp {self.sp} neither divides the model's key/value heads per TP rank "
                                  f"({local_kv}) nor is a multiple of them")

    def coords(self, rank: int) -> tuple[int, int, int]:
        """(pp_rank, dp_rank, tp_rank) of a global rank (its sp rank: ``sp_rank_of``)."""
        tp_rank = rank % self.tp
        dp_rank = (rank // (self.tp * self.sp)) % self.dp
        pp_rank = rank // (self.tp * self.sp * self.dp)
        return pp_rank, dp_rank, tp_rank

    def sp_rank_of(self, rank: int) -> int:
        return (rank // self.tp) % self.sp

    def rank_of(self, pp_rank: int, dp_rank: int, tp_rank: int, sp_rank: int = 0) -> int:
        return ((pp_rank * self.dp + dp_rank) * self.sp + sp_rank) * self.tp + tp_rank

    def _cells(self):
        return [(p, d, s) for p in range(self.pp) for d in range(self.dp) for s in range(self.sp)]

    def tp_groups(self) -> list[list[int]]:
        return [[self.rank_of(p, d, t, s) for t in range(self.tp)] for p, d, s in self._cells()]

    def dp_groups(self) -> list[list[int]]:
        return [[self.rank_of(p, d, t, s) for d in range(self.dp)]
                for p in range(self.pp) for s in range(self.sp) for t in range(self.tp)]

    def pp_groups(self) -> list[list[int]]:
        return [[self.rank_of(p, d, t, s) for p in range(self.pp)]
                for d in range(self.dp) for s in range(self.sp) for t in range(self.tp)]

    def mp_groups(self) -> list[list[int]]:
        """Model-parallel groups (tp × pp): all ranks that hold different pieces of one model replica."""
        return [[self.rank_of(p, d, t, s) for p in range(self.pp) for t in range(self.tp)]
                for d in range(self.dp) for s in range(self.sp)]

    def sp_groups(self) -> list[list[int]]:
        """Sequence-parallel groups: the ranks that share rows (each a 1/sp of them), consecutive modulo tp."""
        return [[self.rank_of(p, d, t, s) for s in range(self.sp)]
                for p in range(self.pp) for d in range(self.dp) for t in range(self.tp)]

    def sp_dp_groups(self) -> list[list[int]]:
        """dp × sp: the ranks that hold the same model shard; ZeRO partitions and gradients reduce over them."""
        return [[self.rank_of(p, d, t, s) for d in range(self.dp) for s in range(self.sp)]
                for p in range(self.pp) for t in range(self.tp)]


def _build_groups(all_groups: list[list[int]], rank: int):
    """Every rank must call new_group for every group in the same order; keep the one containing `rank`."""
    mine = None
    for ranks in all_groups:
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = (group, ranks)
    return mine


class Topology:
    """Process groups for one layout; implements the Megatron-style ``mpu`` interface for DeepSpeed."""

    def __init__(self, dims: ParallelDims):
        if not dist.is_initialized():
            raise RuntimeError("Topology needs an initialised torch.distributed process group")
        if dist.get_world_size() != dims.world_size:
            raise LayoutError(f"layout is for {dims.world_size} ranks but the job has {dist.get_world_size()}")
        self.dims = dims
        self.rank = dist.get_rank()
        self.pp_rank, self.dp_rank, self.tp_rank = dims.coords(self.rank)
        self.tp_group, self.tp_ranks = _build_groups(dims.tp_groups(), self.rank)
        self.dp_group, self.dp_ranks = _build_groups(dims.dp_groups(), self.rank)
        self.pp_group, self.pp_ranks = _build_groups(dims.pp_groups(), self.rank)
        self.mp_group, self.mp_ranks = _build_groups(dims.mp_groups(), self.rank)
        self.sp_rank = dims.sp_rank_of(self.rank)
        if dims.sp > 1:       # only then: an sp=1 job creates exactly the groups it always did
            self.sp_group, self.sp_ranks = _build_groups(dims.sp_groups(), self.rank)
            self.sp_dp_group, self.sp_dp_ranks = _build_groups(dims.sp_dp_groups(), self.rank)
        else:
            self.sp_group, self.sp_ranks = None, [self.rank]
            self.sp_dp_group, self.sp_dp_ranks = self.dp_group, self.dp_ranks

    # --- convenience -------------------------------------------------------------------------------
    @property
    def tp(self) -> int:
        return self.dims.tp

    @property
    def pp(self) -> int:
        return self.dims.pp

    @property
    def dp(self) -> int:
        return self.dims.dp

    @property
    def sp(self) -> int:
        return self.dims.sp

    def tp_group_or_none(self) -> Optional[dist.ProcessGroup]:
        """The TP group, or None at tp=1 (the TP layers then skip all communication)."""
        return self.tp_group if self.tp > 1 else None

    # --- the mpu interface (names from Megatron, as DeepSpeed calls them) --------------------------
    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.dp_ranks)

    def get_model_parallel_group(self):
        return self.mp_group

    def get_model_parallel_rank(self) -> int:
        return self.pp_rank * self.tp + self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp * self.pp

    def get_tensor_model_parallel_group(self):
        return self.tp_group

    def get_tensor_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.tp

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.tp_ranks[0]

    def get_pipeline_model_parallel_group(self):
        return self.pp_group

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.pp

    # Sequence parallelism. DeepSpeed partitions ZeRO state and reduces gradients over
    # ``get_sequence_data_parallel_group`` (dp × sp; the dp group at sp = 1) when the mpu has it. The mpu does
    # NOT offer ``get_sequence_parallel_world_size`` on purpose: given it, DeepSpeed 0.19.8 divides the summed
    # gradients by dp on some paths (ZeRO-0's all-reduce, ZeRO-3's contiguous all-reduce) and by dp × sp on
    # another (ZeRO-3's reduce-scatter, runtime/zero/stage3.py ``__avg_scatter_grads``). Without it every path
    # averages over dp × sp, and the trainer scales each rank's loss by dp × sp / N (training/trainer.py).
    def get_sequence_data_parallel_group(self):
        return self.sp_dp_group

    def get_sequence_data_parallel_rank(self) -> int:
        return self.sp_dp_ranks.index(self.rank)

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.dp * self.sp

    get_pipe_parallel_group = get_pipeline_model_parallel_group
    get_pipe_parallel_rank = get_pipeline_model_parallel_rank
    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size

    def describe(self) -> str:
        sp = f" × sp {self.sp}" if self.sp > 1 else ""
        return (f"world={self.dims.world_size} = pp {self.pp} × dp {self.dp}{sp} × tp {self.tp}; this rank "
                f"{self.rank}: pp_rank {self.pp_rank}, dp_rank {self.dp_rank}"
                + (f", sp_rank {self.sp_rank}" if self.sp > 1 else "") + f", tp_rank {self.tp_rank}")


def teardown() -> None:
    """Leave the job's process groups at the end of a process that completed its work: every rank waits for the
    others in a barrier, then destroys the groups. Without the barrier, a rank that destroys its gloo group while
    a peer has not finished the last collective's transfers can die at exit of ``std::terminate`` ("terminate
    called without an active exception", SIGABRT: the job exits non-zero after doing its work). Every
    multi-process entry point ends here (train.py, tools/precompute_reference.py, tools/evaluate.py); after an
    error use ``witscale.training.distributed.fail_fast`` instead (no barrier: a peer may never reach it)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
