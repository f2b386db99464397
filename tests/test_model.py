"""The model against transformers, packed attention against per-document runs, HF I/O round trips."""
import json
import os

import pytest
import torch
import transformers

from witscale.model import CausalLM, ModelConfig, load_model_weights
from witscale.model.attention import packed_attention
from witscale.model.hf_io import CheckpointFormatError, save_hf_checkpoint

BASE = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
FAMILIES = {
    "llama-gqa": dict(model_type="llama"),
    "llama-mha-tied-llama3rope": dict(model_type="llama", num_key_value_heads=4, tie_word_embeddings=True,
                                      rope_scaling=LLAMA3_ROPE),
    "qwen2-qkv-bias": dict(model_type="qwen2"),
    "mistral-sliding-window": dict(model_type="mistral", sliding_window=5),
}


def _hf_model(overrides, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.AutoConfig.for_model(**dict(BASE, **overrides))
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():       # non-trivial biases and norms, so that loading them is really tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _ours_from(hf_model, tmp_path, **save_kw):
    hf_model.save_pretrained(tmp_path, **save_kw)
    cfg = ModelConfig.from_hf_dir(str(tmp_path))
    model = CausalLM(cfg).eval()
    load_model_weights(model, cfg, model_dir=str(tmp_path), seed=0)
    return model, cfg


def _one_segment_per_row(batch, seq):
    pos = torch.arange(seq).expand(batch, seq)
    cu = torch.arange(0, batch * seq + 1, seq, dtype=torch.int32)
    return pos, cu


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers(family, tmp_path):
    hf = _hf_model(FAMILIES[family])
    ours, _ = _ours_from(hf, tmp_path)
    ids = torch.randint(0, BASE["vocab_size"], (2, 12))
    pos, cu = _one_segment_per_row(2, 12)
    with torch.no_grad():
        got = ours.compute_logits(ours(ids, pos, cu, 12))
        want = hf(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa_segments", "dense"])
def test_packed_row_equals_documents_run_alone(backend, tmp_path):
    hf = _hf_model(FAMILIES["mistral-sliding-window"])
    ours, cfg = _ours_from(hf, tmp_path)
    for layer in ours.model.layers:
        layer.self_attn.backend = backend
    docs = [torch.randint(0, 97, (n,)) for n in (7, 3, 9)]
    row = torch.cat(docs + [torch.zeros(5, dtype=torch.long)])[None]        # three documents and a pad tail
    pos = torch.cat([torch.arange(len(d)) for d in docs] + [torch.arange(5)])[None]
    cu = torch.tensor([0, 7, 10, 19, 24], dtype=torch.int32)
    with torch.no_grad():
        packed = ours.compute_logits(ours(row, pos, cu, 9))[0]
        start = 0
        for d in docs:
            alone = hf(d[None]).logits[0]
            torch.testing.assert_close(packed[start:start + len(d)], alone, rtol=0, atol=1e-5)
            start += len(d)


def test_attention_backends_agree_forward_and_backward():
    torch.manual_seed(0)
    q = torch.randn(2, 16, 4, 8, requires_grad=True)
    k = torch.randn(2, 16, 2, 8, requires_grad=True)
    v = torch.randn(2, 16, 2, 8, requires_grad=True)
    cu = torch.tensor([0, 5, 16, 20, 26, 32], dtype=torch.int32)
    outs, grads = [], []
    for backend in ("sdpa_segments", "dense"):
        out = packed_attention(q, k, v, cu, 11, backend=backend, sliding_window=4)
        g = torch.autograd.grad(out.pow(2).sum(), (q, k, v))
        outs.append(out.detach())
        grads.append(g)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_activation_checkpointing_gives_the_same_gradients(tmp_path):
    hf = _hf_model(FAMILIES["llama-gqa"])
    ours, cfg = _ours_from(hf, tmp_path)
    ours.train()
    ids = torch.randint(0, 97, (2, 10))
    pos, cu = _one_segment_per_row(2, 10)
    labels = torch.randint(0, 97, (2, 10))
    weights = torch.rand(2, 10)
    grads = []
    for flag in (False, True):
        ours.zero_grad()
        ours.model.activation_checkpointing = flag
        ours(ids, pos, cu, 10, labels, weights).weighted_sum.backward()
        grads.append({n: p.grad.clone() for n, p in ours.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=1e-6)


def test_save_hf_checkpoint_loads_in_transformers(tmp_path):
    hf = _hf_model(FAMILIES["qwen2-qkv-bias"])
    ours, cfg = _ours_from(hf, tmp_path / "src")
    state = {n: p.detach() for n, p in ours.named_parameters()}
    save_hf_checkpoint(state, cfg, str(tmp_path / "out"), max_shard_bytes=20_000)   # several shards
    assert os.path.exists(tmp_path / "out" / "model.safetensors.index.json")
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, hf(ids).logits, rtol=0, atol=1e-5)
    # ... and a sharded transformers save loads back into ours.
    ours2, _ = _ours_from(hf, tmp_path / "sharded2", max_shard_size="20KB")
    pos, cu = _one_segment_per_row(1, 9)
    with torch.no_grad():
        torch.testing.assert_close(ours2.compute_logits(ours2(ids, pos, cu, 9)), hf(ids).logits, rtol=0, atol=1e-5)


def test_broken_checkpoints_give_clear_errors(tmp_path):
    hf = _hf_model(FAMILIES["llama-gqa"])
    hf.save_pretrained(tmp_path)
    cfg = ModelConfig.from_hf_dir(str(tmp_path))
    bigger = ModelConfig.from_dict(dict(json.load(open(tmp_path / "config.json")), intermediate_size=64))
    with pytest.raises(ValueError, match=r"mlp\.gate_proj\.weight: expected shape \(64, 32\)"):
        load_model_weights(CausalLM(bigger), bigger, model_dir=str(tmp_path), seed=0)
    from safetensors.torch import load_file, save_file
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointFormatError, match="model.layers.1.mlp.up_proj.weight is missing"):
        load_model_weights(CausalLM(cfg), cfg, model_dir=str(tmp_path), seed=0)
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        ModelConfig.from_dict(dict(BASE, model_type="gpt2"))
