"""Device discipline and failing fast: what a GPU run needs, checked on the CPU.

On a GPU every tensor of the hot path must live on the engine's device: NCCL refuses host tensors, and a
host tensor added to a device tensor fails. This machine has only the CPU, where host and device are the
same, so the tests make the mistake visible another way:
- every tensor witscale creates during a step or an evaluation must name its device. The steps run under
  ``torch.set_default_device("meta")``: a tensor created without ``device=`` lands on the meta device,
  and the first collective, host read or addition with a real tensor then fails (DeepSpeed's own step
  code runs unharmed under it: it names its devices);
- every micro-batch must be moved with ``MicroBatch.to(trainer.device)`` and that moved batch must be
  what the engine's module receives (a spy on ``MicroBatch.to`` and a forward pre-hook compare them);
- every tensor given to a collective during the step is on ``trainer.device`` (a spy on the collectives).
What this cannot catch: a tensor created with an explicit ``device="cpu"``, or ``.cpu()`` in the hot path;
and under pp, code that runs inside DeepSpeed's pipeline schedule (the probe is lifted there, see below).
The attention backend is ``dense``, the GPU's fallback path (sdpa_grouped is the CPU-only backend).
"""
import os
import time

import numpy as np
import pytest

from tests.distributed import run_distributed
from tests.test_train_cli_operations import _args, _env, _torchrun, run_inputs  # noqa: F401 - fixture
from tests.train_helpers import TINY, ds_config, random_packed

pytestmark = pytest.mark.slow  # gloo and torchrun ranks


def _device_worker(rank, world, stage, pp):
    import torch
    import torch.distributed as dist

    from witscale.data.loader import MicroBatch, PackedLoader
    from witscale.data.weighting import build_weight_table
    from witscale.training.distributed import init_distributed
    from witscale.model import ModelConfig
    from witscale.parallel.topology import ParallelDims, Topology
    from witscale.training.build import build_module
    from witscale.training.trainer import Trainer

    init_distributed()
    cfg = ModelConfig.from_dict(TINY)
    topo = Topology(ParallelDims(world, 1, pp, stage, cfg))
    config = ds_config(stage, 1, 2, topo.dp, clip=1.0)
    module = build_module(cfg, topo, config, model_dir=None, seed=0, attention="dense")
    data = random_packed(8, 48, cfg.vocab_size, 1, with_weights=True)
    loader = PackedLoader(data, build_weight_table(0.3, 1.0), micro_batch_size=1, grad_accum=2,
                          dp_size=topo.dp, dp_rank=topo.dp_rank, vocab_size=cfg.vocab_size)
    trainer = Trainer(module=module, ds_config=config, loader=loader, topo=topo, normalization="nonzero",
                      lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, total_steps=4, warmup_ratio=0.0)
    reference = trainer.train_step(loader.next_step())      # first step outside the probes (engine warm-up)

    moved, seen, collective_devices = [], [], []
    original_to = MicroBatch.to

    def spy_to(self, device):
        out = original_to(self, device)
        moved.append((torch.device(device), out.input_ids.data_ptr()))
        return out

    def pre_hook(_module, args):
        seen.append(args[0].data_ptr())

    spied = {}
    for name in ("all_reduce", "broadcast", "all_gather", "reduce_scatter_tensor", "all_gather_into_tensor"):
        fn = getattr(dist, name)

        def record(*args, _fn=fn, **kwargs):
            t = args[0] if args else next(iter(kwargs.values()))
            for x in (t if isinstance(t, (list, tuple)) else [t]):
                if isinstance(x, torch.Tensor):
                    collective_devices.append(x.device)
            return _fn(*args, **kwargs)
        spied[name] = fn
        setattr(dist, name, record)
    if pp > 1:
        # DeepSpeed's pipeline engine creates its p2p metadata tensors on the default device itself: lift the
        # probe inside its schedule (witscale's code around it stays under the probe).
        for name in ("train_batch", "eval_batch"):
            def outside_probe(*args, _fn=getattr(trainer.engine, name), **kwargs):
                torch.set_default_device(None)
                try:
                    return _fn(*args, **kwargs)
                finally:
                    torch.set_default_device("meta")
            setattr(trainer.engine, name, outside_probe)
    MicroBatch.to = spy_to
    handle = trainer.engine.module.register_forward_pre_hook(pre_hook) if pp == 1 else None
    torch.set_default_device("meta")
    try:
        results = [trainer.train_step(loader.next_step()) for _ in range(2)]
        evaluation = trainer.evaluate(loader)
    finally:
        torch.set_default_device(None)
        MicroBatch.to = original_to
        for name, fn in spied.items():
            setattr(dist, name, fn)
        if handle is not None:
            handle.remove()
    return {"device": str(trainer.device), "moved": [(str(d), p) for d, p in moved],
            "seen": seen, "collective_devices": sorted({str(d) for d in collective_devices}),
            "n_collectives": len(collective_devices), "losses": [reference.loss] + [r.loss for r in results],
            "grad_norms": [r.grad_norm for r in results], "eval_loss": evaluation["eval_loss"]}


@pytest.mark.parametrize("stage,pp", [(0, 1), (3, 1), (1, 2)], ids=["zero0", "zero3", "pp2-zero1"])
def test_micro_batches_and_reductions_stay_on_the_trainers_device(stage, pp):
    for r in run_distributed(_device_worker, 2, stage, pp, timeout=300):
        assert all(np.isfinite(r["losses"])) and np.isfinite(r["eval_loss"])
        assert all(g is not None and np.isfinite(g) for g in r["grad_norms"])
        # 2 steps × 2 micro-batches, then the evaluation's micro-batches: all moved to the trainer's device
        assert len(r["moved"]) >= 4 and {d for d, _ in r["moved"]} == {r["device"]}
        if pp == 1:      # the engine's module received exactly the moved tensors
            assert r["seen"] and set(r["seen"]) <= {i for _, i in r["moved"]}
        assert r["n_collectives"] > 0 and r["collective_devices"] == [r["device"]]


def test_a_rank_that_raises_ends_the_job_within_seconds(run_inputs, tmp_path):
    """Rank 1 raises before step 2 while rank 0 enters the step's collectives: the job must exit non-zero
    within seconds with rank 1's traceback — not wait for the collective timeout (10 minutes here)."""
    proc = _torchrun(_args(run_inputs, tmp_path, 4, "--dist-timeout", "10"), wait=False,
                     env=_env(WITSCALE_FAULT="raise_in_step:2:1"))
    lines, raised_at = [], None
    deadline = time.monotonic() + 240
    for line in proc.stdout:
        lines.append(line)
        if raised_at is None and "injected fault before step 2" in line:
            raised_at = time.monotonic()
        if time.monotonic() > deadline:
            break
    try:
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    ended = time.monotonic()
    log = "".join(lines)
    assert raised_at is not None, log[-3000:]
    assert code != 0, log[-3000:]
    assert "Traceback" in log and "RuntimeError: injected fault before step 2" in log
    assert ended - raised_at < 30, f"the job took {ended - raised_at:.0f} s to end after the failure"
    # Step 1 was logged; step 2 never completed on any rank.
    assert '"step": 2' not in open(tmp_path / "metrics.jsonl").read()
