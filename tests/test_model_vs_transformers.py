"""The model against transformers, packed attention against per-document runs, HF I/O round trips.

Every comparison builds a tiny transformers model with random weights (non-trivial norms and biases, so
that loading them is really tested), saves or copies it into ours, and compares logits in fp32.
"""
import json
import logging
import os

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file

from witscale.model import (CausalLM, CheckpointFormatError, ModelConfig, init_weights, load_hf_weights,
                            load_model_weights, packed_positions, save_hf_checkpoint)
from witscale.model import attention as attention_mod
from witscale.model.attention import packed_attention, select_backend
from witscale.model.hf_io import SafetensorsSource, parse_size, shard_of_slice

VOCAB = 97
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
FAMILIES = {
    "llama-gqa": dict(model_type="llama"),
    "llama-mha-tied-llama3rope": dict(model_type="llama", num_key_value_heads=4, tie_word_embeddings=True,
                                      rope_scaling=LLAMA3_ROPE),
    # attention_bias covers o_proj too in Llama; explicit head_dim != hidden/heads; linear RoPE scaling
    "llama-bias-headdim-linearrope": dict(model_type="llama", attention_bias=True, mlp_bias=True, head_dim=16,
                                          rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "qwen2-qkv-bias": dict(model_type="qwen2"),
    "qwen2-tied-mqa": dict(model_type="qwen2", num_key_value_heads=1, tie_word_embeddings=True),
    "mistral-sliding-window": dict(model_type="mistral", sliding_window=5),
    "mistral-no-window": dict(model_type="mistral", sliding_window=None, rope_theta=1e6),
}
ENV = dict(OMP_NUM_THREADS="1")


def _hf_model(overrides, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.AutoConfig.for_model(**dict(BASE, **overrides))
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
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
    return packed_positions([[seq]] * batch, seq)


def _logits(model, ids, pos=None, cu=None, max_len=None):
    if pos is None:
        pos, cu, max_len = _one_segment_per_row(*ids.shape)
    with torch.no_grad():
        return model.compute_logits(model(ids, pos, cu, max_len))


# ---- logits against transformers -------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers(family, tmp_path):
    hf = _hf_model(FAMILIES[family])
    ours, cfg = _ours_from(hf, tmp_path)
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        want = hf(ids).logits
    torch.testing.assert_close(_logits(ours, ids), want, rtol=0, atol=1e-5)
    # RoPE frequencies bit-identical (fp32 as transformers computes them, so long positions agree too).
    assert torch.equal(ours.model.rotary[0].inv_freq, hf.model.rotary_emb.inv_freq)
    # The names are HF's: the transformers state dict (tied head included) loads strictly as well.
    fresh = CausalLM(cfg).eval()
    fresh.load_state_dict(hf.state_dict(), strict=True)
    torch.testing.assert_close(_logits(fresh, ids), want, rtol=0, atol=1e-5)


def test_long_positions_match_transformers(tmp_path):
    # Positions in the thousands (where scaled RoPE matters) agree too.
    hf = _hf_model(FAMILIES["llama-mha-tied-llama3rope"])
    ours, _ = _ours_from(hf, tmp_path)
    ids = torch.randint(0, VOCAB, (1, 8))
    pos = torch.arange(3000, 3008)[None]
    with torch.no_grad():
        want = hf(ids, position_ids=pos).logits
    cu = torch.tensor([0, 8], dtype=torch.int32)
    torch.testing.assert_close(_logits(ours, ids, pos, cu, 8), want, rtol=0, atol=1e-5)


def test_bf16_cast_keeps_rope_frequencies_fp32():
    cfg = ModelConfig.from_dict(dict(BASE, model_type="llama"))
    model = CausalLM(cfg).to(torch.bfloat16)
    assert model.model.rotary[0].inv_freq.dtype == torch.float32
    ids = torch.randint(0, VOCAB, (1, 6))
    assert model.compute_logits(model(ids, *_one_segment_per_row(1, 6))).dtype == torch.bfloat16


# ---- packed attention --------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["sdpa_grouped", "sdpa_segments", "dense"])
@pytest.mark.parametrize("family", ["mistral-sliding-window", "qwen2-qkv-bias"])
def test_packed_row_equals_documents_run_alone(family, backend, tmp_path):
    hf = _hf_model(FAMILIES[family])
    ours, _ = _ours_from(hf, tmp_path)
    ours.set_attention_backend(backend)
    rows = [[7, 3, 9], [12, 1]]                   # row 0 has a 5-token pad tail, row 1 a 11-token one
    pos, cu, max_len = packed_positions(rows, 24)
    docs = [[torch.randint(0, VOCAB, (n,)) for n in lens] for lens in rows]
    ids = torch.stack([torch.cat(d + [torch.zeros(24 - sum(lens), dtype=torch.long)])
                       for d, lens in zip(docs, rows)])
    packed = _logits(ours, ids, pos, cu, max_len)
    with torch.no_grad():
        for r, row_docs in enumerate(docs):
            start = 0
            for d in row_docs:
                alone = hf(d[None]).logits[0]
                torch.testing.assert_close(packed[r, start:start + len(d)], alone, rtol=0, atol=1e-5)
                start += len(d)


@pytest.mark.parametrize("window", [None, 4])
def test_attention_backends_agree_forward_and_backward(window):
    torch.manual_seed(0)
    q = torch.randn(2, 16, 4, 8, requires_grad=True)
    k = torch.randn(2, 16, 2, 8, requires_grad=True)
    v = torch.randn(2, 16, 2, 8, requires_grad=True)
    cu = torch.tensor([0, 5, 16, 20, 26, 32], dtype=torch.int32)     # lengths 5, 11, 4, 6, 6
    outs, grads = [], []
    for backend in ("sdpa_segments", "dense", "sdpa_grouped"):
        out = packed_attention(q, k, v, cu, 11, backend=backend, sliding_window=window)
        g = torch.autograd.grad(out.pow(2).sum(), (q, k, v))
        outs.append(out.detach())
        grads.append(g)
    for other in (1, 2):
        torch.testing.assert_close(outs[other], outs[0], rtol=0, atol=1e-5)
        for a, b in zip(grads[other], grads[0]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # ... and the segments really are isolated: the first token of segment 2 sees only itself.
    first = outs[0][0, 5]
    torch.testing.assert_close(first, v[0, 5].detach().repeat_interleave(2, dim=0), rtol=0, atol=1e-6)


def test_attention_rejects_bad_segments():
    q = k = v = torch.randn(2, 4, 2, 8)
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to the 8"):
        packed_attention(q, k, v, torch.tensor([0, 3, 7], dtype=torch.int32), 4, backend="sdpa_segments")
    with pytest.raises(ValueError, match="row boundary"):     # a segment across rows 0 and 1
        packed_attention(q, k, v, torch.tensor([0, 2, 6, 8], dtype=torch.int32), 4, backend="dense")


def test_backend_selection_is_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(attention_mod, "_announced", set())
    with caplog.at_level(logging.INFO, logger="witscale"):
        assert select_backend("auto", torch.device("cpu")) == "sdpa_grouped"
        assert select_backend("auto", torch.device("cpu")) == "sdpa_grouped"
    assert [r.getMessage() for r in caplog.records].count("packed attention backend: sdpa_grouped") == 1
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="flash-attn"):
            select_backend("flash_varlen", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown attention backend 'flash3'"):
        select_backend("flash3")


def test_packed_positions():
    pos, cu, max_len = packed_positions([[3, 2], [6], [0, 4]], 6)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 0, 1]]
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 5, 6, 12, 16, 18]
    assert max_len == 6
    with pytest.raises(ValueError, match=r"row 1: document lengths \[4, 3\] do not fit in seq_len 6"):
        packed_positions([[6], [4, 3]], 6)


# ---- activation checkpointing, init --------------------------------------------------------------------------

def test_activation_checkpointing_gives_the_same_gradients(tmp_path):
    hf = _hf_model(FAMILIES["llama-gqa"])
    ours, _ = _ours_from(hf, tmp_path)
    ours.train()
    ids, labels = torch.randint(0, VOCAB, (2, 10)), torch.randint(0, VOCAB, (2, 10))
    pos, cu, max_len = packed_positions([[4, 6], [10]], 10)
    calls = []
    layer = ours.model.layers[0]
    inner = layer.forward
    layer.forward = lambda *args: calls.append(1) or inner(*args)     # (forward hooks skip recomputation)
    grads, counts = [], []
    for flag in (False, True):
        ours.zero_grad()
        calls.clear()
        ours.set_activation_checkpointing(flag)
        logits = ours.compute_logits(ours(ids, pos, cu, max_len))
        F.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()
        grads.append({n: p.grad.clone() for n, p in ours.named_parameters()})
        counts.append(len(calls))
    assert counts == [1, 2]                 # checkpointing really recomputed the layer in backward
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=1e-6)


def test_seeded_init_follows_the_config():
    cfg = ModelConfig.from_dict(dict(BASE, model_type="qwen2", initializer_range=0.5, hidden_size=64,
                                     intermediate_size=128, vocab_size=300))
    a, b = CausalLM(cfg), CausalLM(cfg)
    init_weights(a, seed=3)
    init_weights(b, seed=3)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    assert torch.all(a.model.norm.weight == 1) and torch.all(a.model.layers[0].self_attn.q_proj.bias == 0)
    assert abs(a.model.embed_tokens.weight.std().item() - 0.5) < 0.02
    init_weights(b, seed=4)
    assert not torch.equal(a.lm_head.weight, b.lm_head.weight)


# ---- HF I/O -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,shard", [("qwen2-qkv-bias", 20_000), ("llama-mha-tied-llama3rope", "5GB")])
def test_save_hf_checkpoint_loads_in_transformers(family, shard, tmp_path):
    hf = _hf_model(FAMILIES[family])
    ours, cfg = _ours_from(hf, tmp_path / "src")
    state = ours.state_dict()           # tied: holds lm_head.weight too, sharing the embedding's storage
    out = tmp_path / "out"
    save_hf_checkpoint(state, cfg, str(out), max_shard_size="5GB")     # an earlier export (its marker) …
    (out / "stale.txt").write_text("an older export")                   # … is replaced whole
    save_hf_checkpoint(state, cfg, str(out), max_shard_size=shard)
    assert not (out / "stale.txt").exists()
    assert (out / "model.safetensors.index.json").exists() == (shard == 20_000)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]     # no temporary directory left
    assert ModelConfig.from_hf_dir(str(out)) == cfg
    again = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, hf(ids).logits, rtol=0, atol=1e-5)


def test_load_from_sharded_transformers_save(tmp_path):
    hf = _hf_model(FAMILIES["mistral-sliding-window"])
    ours, _ = _ours_from(hf, tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 2
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(_logits(ours, ids), hf(ids).logits, rtol=0, atol=1e-5)


def test_slice_fn_reads_lazily_and_tp_shards(tmp_path):
    hf = _hf_model(FAMILIES["llama-gqa"])
    hf.save_pretrained(tmp_path)
    cfg = ModelConfig.from_hf_dir(str(tmp_path))
    seen = []

    def slice_fn(name, sl):
        seen.append((name, tuple(sl.get_shape())))
        return sl[:]
    load_hf_weights(CausalLM(cfg), str(tmp_path), slice_fn)
    assert ("model.layers.1.self_attn.k_proj.weight", (16, 32)) in seen and len(seen) == len(hf.state_dict())
    # What a tensor-parallel rank reads: its rows (column-parallel), columns (row-parallel), and zero rows
    # where the vocabulary (97) is padded to a multiple of tp (98).
    src = SafetensorsSource(str(tmp_path))
    full = load_file(tmp_path / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(shard_of_slice(src.slice(q), 0, 1, 2), full[q][16:])
    o = "model.layers.0.self_attn.o_proj.weight"
    torch.testing.assert_close(shard_of_slice(src.slice(o), 1, 0, 2), full[o][:, :16])
    emb = shard_of_slice(src.slice("model.embed_tokens.weight"), 0, 1, 2, padded_rows=98)
    assert emb.shape == (49, 32) and torch.all(emb[-1] == 0)
    torch.testing.assert_close(emb[:-1], full["model.embed_tokens.weight"][49:])


def test_broken_checkpoints_give_clear_errors(tmp_path):
    hf = _hf_model(FAMILIES["llama-gqa"])
    hf.save_pretrained(tmp_path)
    cfg = ModelConfig.from_hf_dir(str(tmp_path))
    path = tmp_path / "model.safetensors"
    bigger = ModelConfig.from_dict(dict(json.load(open(tmp_path / "config.json")), intermediate_size=64))
    with pytest.raises(CheckpointFormatError, match=r"model\.safetensors: tensor model\.layers\.0\.mlp\.gate_proj"
                                                    r"\.weight gives shape \(48, 32\).*expects \(64, 32\)"):
        load_model_weights(CausalLM(bigger), bigger, model_dir=str(tmp_path), seed=0)
    state = load_file(path)
    save_file(dict(state, **{"model.layers.0.self_attn.rotary_extra": torch.zeros(2)}), path)
    with pytest.raises(CheckpointFormatError, match="tensor model.layers.0.self_attn.rotary_extra is not a param"):
        load_hf_weights(CausalLM(cfg), str(tmp_path))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointFormatError, match="tensor model.layers.1.mlp.up_proj.weight is missing"):
        load_model_weights(CausalLM(cfg), cfg, model_dir=str(tmp_path), seed=0)
    os.remove(path)
    with pytest.raises(CheckpointFormatError, match="no \\*.safetensors weights"):
        load_hf_weights(CausalLM(cfg), str(tmp_path))


def test_sharded_index_naming_a_missing_file(tmp_path):
    hf = _hf_model(FAMILIES["llama-gqa"])
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    victim = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))[1]
    os.remove(tmp_path / victim)
    with pytest.raises(CheckpointFormatError, match=f"lists {victim}, which is missing"):
        SafetensorsSource(str(tmp_path))


def test_save_refuses_a_state_dict_that_does_not_fit_the_config(tmp_path):
    cfg = ModelConfig.from_dict(dict(BASE, model_type="llama"))
    state = CausalLM(cfg).state_dict()
    half = dict(state, **{"model.layers.0.mlp.up_proj.weight": state["model.layers.0.mlp.up_proj.weight"][:24]})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight has shape \(24, 32\)"):
        save_hf_checkpoint(half, cfg, str(tmp_path / "out"))
    with pytest.raises(ValueError, match="missing model.norm.weight"):
        save_hf_checkpoint({k: v for k, v in state.items() if k != "model.norm.weight"}, cfg, str(tmp_path / "o"))
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "o")
    assert parse_size("20KB") == 20_000 and parse_size("1GiB") == 2 ** 30 and parse_size(123) == 123
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("lots")


# ---- config -----------------------------------------------------------------------------------------------

def test_config_reads_hf_defaults_and_formats():
    mistral = ModelConfig.from_dict(dict(BASE, model_type="mistral"))          # no sliding_window key
    assert mistral.sliding_window == 4096
    assert ModelConfig.from_dict(dict(BASE, model_type="mistral", sliding_window=None)).sliding_window is None
    qwen = ModelConfig.from_dict(dict(BASE, model_type="qwen2", sliding_window=8, use_sliding_window=False))
    assert qwen.sliding_window is None and qwen.attention_bias and not qwen.o_bias
    llama = ModelConfig.from_dict(dict(BASE, model_type="llama", attention_bias=True, head_dim=16))
    assert llama.attention_bias and llama.o_bias and llama.head_dim == 16
    no_kv = {k: v for k, v in BASE.items() if k != "num_key_value_heads"}
    assert ModelConfig.from_dict(dict(no_kv, model_type="llama")).num_key_value_heads == 4
    # transformers 5 writes rope settings as rope_parameters; without a max, llama3 falls back to it
    v5 = ModelConfig.from_dict(dict(BASE, model_type="llama", rope_parameters=dict(
        rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)))
    assert v5.rope_theta == 5e5 and v5.rope_scaling["original_max_position_embeddings"] == 64
    assert ModelConfig.from_dict(v5.to_hf_dict()) == v5


@pytest.mark.parametrize("change,message", [
    (dict(model_type="gpt2"), "model_type 'gpt2' is not supported"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 4.0}), "rope_type 'dynamic' is not supported"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "needs 'low_freq_factor'"),
    (dict(rope_scaling={"type": "linear"}), "linear needs 'factor'"),
    (dict(num_key_value_heads=3), r"num_attention_heads \(4\) is not a multiple of num_key_value_heads \(3\)"),
    (dict(hidden_size=30), r"hidden_size \(30\) is not divisible"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor 0.5 is not supported"),
    (dict(attention_dropout=0.1), "attention_dropout 0.1 is not supported"),
    (dict(vocab_size=0), "vocab_size must be a positive integer"),
    (dict(intermediate_size=None), "config is missing intermediate_size"),
])
def test_config_errors_name_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(dict(BASE, **dict(dict(model_type="llama"), **change)))


def test_config_file_errors_name_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(BASE, model_type="qwen2", hidden_act="gelu")))
    with pytest.raises(ValueError, match=r"config\.json: hidden_act 'gelu' is not supported"):
        ModelConfig.from_hf_dir(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: invalid JSON at line 1"):
        ModelConfig.from_hf_dir(str(tmp_path))


# ---- tensor-parallel loading ------------------------------------------------------------------------------

def _tp_load_worker(rank, world, model_dir):
    import torch.distributed as dist

    from witscale.model import tp_slice_fn

    group = dist.new_group(list(range(world)))
    cfg = ModelConfig.from_hf_dir(model_dir)
    model = CausalLM(cfg, group).eval()
    load_hf_weights(model, model_dir, tp_slice_fn(model, rank, world))
    local_q = model.model.layers[0].self_attn.q_proj.weight.shape
    ids = torch.arange(18).remainder(VOCAB).view(2, 9) * 5 % VOCAB
    return local_q, _logits(model, ids).numpy()


@pytest.mark.slow
def test_tp2_ranks_read_their_slices_of_a_sharded_checkpoint(tmp_path):
    from tests.distributed import run_distributed

    hf = _hf_model(FAMILIES["qwen2-qkv-bias"])          # vocab 97: padded to 98 at tp=2; 4 heads / 2 kv heads
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    ids = torch.arange(18).remainder(VOCAB).view(2, 9) * 5 % VOCAB
    with torch.no_grad():
        want = hf(ids).logits
    for local_q, logits in run_distributed(_tp_load_worker, 2, str(tmp_path)):
        assert tuple(local_q) == (16, 32)                # half of the 4 × 8 query rows
        torch.testing.assert_close(torch.from_numpy(logits), want, rtol=0, atol=1e-5)
