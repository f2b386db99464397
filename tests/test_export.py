"""Streaming HF export from every layout, live (``export_module``, what ``--export-hf`` runs) and offline
(``tools/export_hf.py`` on the checkpoint the same run wrote), in bf16 and fp32: the files load in
``transformers`` with the logits of witscale's own model, and live and offline exports agree bit for bit.
One short training run per layout (real gloo ranks, real DeepSpeed engines) serves all the checks."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO_ROOT
from tests.distributed import run_distributed
from tests.train_helpers import TINY, ds_config, random_packed

LAYOUTS = {   # name: (world, tp, pp, ZeRO stage, tied embeddings)
    "zero3-dp2": (2, 1, 1, 3, False),
    "tp2": (2, 2, 1, 1, False),
    "pp2": (2, 1, 2, 1, False),
    "tp2xpp2": (4, 2, 2, 1, True),
}


def _export_worker(rank, world, tp, pp, stage, tied, out):
    from witscale.data.loader import PackedLoader
    from witscale.data.weighting import build_weight_table
    from witscale.model import ModelConfig
    from witscale.parallel.topology import ParallelDims, Topology
    from witscale.training import checkpoint
    from witscale.training.build import build_module
    from witscale.training.distributed import init_distributed
    from witscale.training.export import export_from_engine, export_module
    from witscale.training.trainer import Trainer

    init_distributed()
    cfg = ModelConfig.from_dict(dict(TINY, tie_word_embeddings=tied))
    topo = Topology(ParallelDims(world, tp, pp, stage, cfg))
    conf = ds_config(stage, 1, 2, topo.dp)
    module = build_module(cfg, topo, conf, model_dir=None, seed=0)
    loader = PackedLoader(random_packed(8, 32, cfg.vocab_size, 1), build_weight_table(0.3, 1.0), micro_batch_size=1,
                          grad_accum=2, dp_size=topo.dp, dp_rank=topo.dp_rank, seed=0)
    trainer = Trainer(module=module, ds_config=conf, loader=loader, topo=topo, normalization="nonzero", lr=1e-2,
                      weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, total_steps=1, warmup_ratio=0.0)
    trainer.train_step(loader.next_step())
    checkpoint.save(trainer.engine, os.path.join(out, "checkpoints"), 1, {"step": 1}, keep=1)
    if rank == 0:
        with open(os.path.join(out, "model_config.json"), "w") as f:
            json.dump(cfg.to_hf_dict(), f)
    export_from_engine(trainer, cfg, os.path.join(out, "live_bf16"))                 # the default: bf16
    # fp32, in shards of ~6 KB: the index path of the writer
    export_module(trainer.engine.module, topo, cfg, os.path.join(out, "live_fp32"), dtype="fp32",
                  max_shard_size=6000)
    dense = trainer.full_dense_state_dict()
    return {k: v.numpy() for k, v in dense.items()} if rank == 0 else None


@pytest.fixture(scope="module", params=list(LAYOUTS))
def exported(request, tmp_path_factory):
    world, tp, pp, stage, tied = LAYOUTS[request.param]
    out = tmp_path_factory.mktemp(request.param)
    dense = run_distributed(_export_worker, world, tp, pp, stage, tied, str(out), timeout=300)[0]
    return request.param, out, {k: torch.from_numpy(v) for k, v in dense.items()}


def _tensors(hf_dir):
    from safetensors.torch import load_file
    files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
    return {k: v for f in files for k, v in load_file(os.path.join(hf_dir, f)).items()}


@pytest.mark.slow
def test_export_loads_in_transformers_with_witscale_logits(exported):
    import transformers

    from witscale.model import CausalLM, ModelConfig

    name, out, dense = exported
    cfg = ModelConfig.from_json_file(str(out / "model_config.json"))
    ids = torch.randint(3, cfg.vocab_size, (2, 20))
    pos, cu = torch.arange(20).repeat(2, 1), torch.tensor([0, 20, 40], dtype=torch.int32)
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        hf_dir = out / f"live_{dtype}"
        assert json.load(open(hf_dir / "config.json"))["torch_dtype"] == str(torch_dtype).replace("torch.", "")
        files = _tensors(hf_dir)
        assert all(t.dtype == torch_dtype for t in files.values())
        assert (hf_dir / "model.safetensors.index.json").exists() == (dtype == "fp32")
        # the dense state of the live run, rounded to the export dtype, is exactly what was written
        want = {k: v.to(torch_dtype) for k, v in dense.items()
                if not (k == "lm_head.weight" and cfg.tie_word_embeddings)}
        assert files.keys() == want.keys()
        for k in want:
            assert torch.equal(files[k], want[k]), f"{name} {dtype}: {k}"
        ours = CausalLM(cfg).eval()
        ours.load_state_dict({k: v.to(torch_dtype).float() for k, v in dense.items()}, strict=False)
        if cfg.tie_word_embeddings:
            assert ours.lm_head.weight is ours.model.embed_tokens.weight
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
        with torch.no_grad():
            torch.testing.assert_close(hf(input_ids=ids).logits, ours.compute_logits(ours(ids, pos, cu, 20)),
                                       rtol=1e-4, atol=2e-5, msg=f"{name} {dtype}")


@pytest.mark.slow
def test_offline_export_equals_live_export(exported, monkeypatch):
    """tools/export_hf.py reads the checkpoint of the same layout (no pickle executed) and writes the same
    tensors as the live export, in both dtypes (in-process: with the files mapped afresh every few KB)."""
    from witscale.training.export import CheckpointReader, export_checkpoint

    name, out, _ = exported
    monkeypatch.setattr(CheckpointReader, "REMAP_BYTES", 4000)
    export_checkpoint(str(out / "checkpoints"), str(out / "offline_bf16"))
    if name == "tp2xpp2":       # the command line, once: flags and exit code
        res = subprocess.run([sys.executable, "tools/export_hf.py", str(out / "checkpoints"), str(out / "offline_fp32"),
                              "--export-dtype", "fp32"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                             env=dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"))
        assert res.returncode == 0, res.stderr[-2000:]
    else:
        export_checkpoint(str(out / "checkpoints"), str(out / "offline_fp32"), dtype="fp32")
    for dtype in ("bf16", "fp32"):
        live, offline = _tensors(out / f"live_{dtype}"), _tensors(out / f"offline_{dtype}")
        assert live.keys() == offline.keys()
        for k in live:
            assert torch.equal(live[k], offline[k]), f"{name} {dtype}: {k}"
        assert json.load(open(out / f"offline_{dtype}" / "config.json")) == \
            json.load(open(out / f"live_{dtype}" / "config.json"))
    assert not [p for p in os.listdir(out) if p.startswith(".")]          # no temporary directory left


def test_writer_streams_into_planned_shards_and_is_atomic(tmp_path):
    """HFShardWriter: shards planned from the config, tensors written in any order, nothing at the target
    until commit; a failure leaves no directory; wrong shapes and unknown names are refused."""
    from safetensors import safe_open

    from witscale.model import CausalLM, ModelConfig
    from witscale.model.hf_io import HFShardWriter, model_plan

    cfg = ModelConfig.from_dict(TINY)
    state = CausalLM(cfg).state_dict()
    out = tmp_path / "hf"
    writer = HFShardWriter(str(out), model_plan(cfg, torch.bfloat16), cfg.to_hf_dict(), max_shard_size=5000)
    with pytest.raises(ValueError, match=r"model\.norm\.weight has shape \(3,\)"):
        writer.write("model.norm.weight", torch.ones(3))
    with pytest.raises(ValueError, match="not part of the model"):
        writer.write("model.layers.9.mlp.up_proj.weight", torch.ones(3))
    for name in reversed(list(state)):
        assert not out.exists()
        writer.write(name, state[name])
    with pytest.raises(ValueError, match="written twice"):
        writer.write("model.norm.weight", state["model.norm.weight"])
    writer.commit()
    index = json.load(open(out / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 2
    for name, fname in index["weight_map"].items():
        with safe_open(str(out / fname), framework="pt") as f:
            assert torch.equal(f.get_tensor(name), state[name].to(torch.bfloat16))
    with pytest.raises(ValueError, match="export incomplete"):
        with HFShardWriter(str(tmp_path / "partial"), model_plan(cfg, torch.float32), cfg.to_hf_dict()) as w:
            w.write("model.norm.weight", state["model.norm.weight"])
            w.commit()
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_export_dtype_flag_is_checked(tmp_path):
    from witscale.model.hf_io import export_dtype
    from witscale.train import build_parser

    assert export_dtype("bf16") is torch.bfloat16 and export_dtype("fp32") is torch.float32
    with pytest.raises(ValueError, match="export dtype"):
        export_dtype("fp16")
    args = build_parser().parse_args(["--ds_config", "x", "--data", "d", "--model-config", "c", "--output-dir", "o"])
    assert args.export_dtype == "bf16"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--ds_config", "x", "--data", "d", "--model-config", "c", "--output-dir", "o", "--export-dtype", "fp8"])
