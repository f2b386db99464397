"""Building and loading the model allocates what a rank keeps, not the whole model (measured, not assumed).

Each rank resets its peak resident memory (Linux: ``/proc/self/clear_refs`` ← 5 resets VmHWM to the current
RSS), builds its module through the one build path (witscale/training/build.py: no throw-away random
init, this rank's shard or stage only) and fills it through the one load path, then reads VmHWM. The
peak above the starting RSS must stay within what the rank keeps plus the largest single dense tensor
(the seeded init draws each parameter at its dense shape before cutting this rank's shard) plus a little
allocator slack, and well below the whole model.
"""
import numpy as np
import pytest

from tests.distributed import run_distributed
from tests.train_helpers import TINY, ds_config

# ~27M parameters: 108 MB in fp32, large enough that RSS noise (a few MB) does not matter.
MODEL = dict(TINY, vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
SLACK = 24 * 2 ** 20


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _build_worker(rank, world, tp, pp, stage):
    import torch

    from witscale.model import ModelConfig, dense_shapes
    from witscale.parallel.topology import ParallelDims, Topology
    from witscale.training.build import build_module
    from witscale.training.distributed import init_distributed

    init_distributed()
    # Freed blocks must go back to the OS for RSS to measure what is live: a fixed mmap threshold (glibc
    # otherwise raises it after the first large free and keeps later blocks of that size on its heap).
    import ctypes
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)      # M_MMAP_THRESHOLD = 1 MiB
    cfg = ModelConfig.from_dict(MODEL)
    topo = Topology(ParallelDims(world, tp, pp, stage, cfg))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = _vm_kib("VmRSS")
    module = build_module(cfg, topo, ds_config(stage, 1, 1, topo.dp), model_dir=None, seed=0)
    peak = _vm_kib("VmHWM") - start
    kept = sum(p.numel() * p.element_size() for p in {id(p): p for p in module.parameters()}.values())
    shapes = dense_shapes(cfg)
    full = sum(int(np.prod(s)) for s in shapes.values()) * 4
    largest = max(int(np.prod(s)) for s in shapes.values()) * 4
    assert all(p.dtype == torch.float32 for p in module.parameters())
    return {"peak": peak * 1024, "kept": kept, "full": full, "largest": largest}


@pytest.mark.parametrize("tp,pp,stage", [(1, 2, 1), (2, 1, 1)], ids=["pp2-zero1", "tp2-zero1"])
def test_build_and_load_allocate_only_this_ranks_share(tp, pp, stage):
    for r in run_distributed(_build_worker, 2, tp, pp, stage, timeout=240):
        assert r["kept"] < 0.7 * r["full"], r
        assert r["peak"] <= r["kept"] + r["largest"] + SLACK, (
            f"peak {r['peak'] / 2 ** 20:.0f} MiB for {r['kept'] / 2 ** 20:.0f} MiB kept "
            f"(largest dense tensor {r['largest'] / 2 ** 20:.0f} MiB, whole model {r['full'] / 2 ** 20:.0f} MiB)")
        assert r["peak"] < 0.8 * r["full"]
