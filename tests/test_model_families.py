"""Every model family against transformers at tp=1: Gemma-2, Gemma-3 (text, and the language model of a
multimodal checkpoint), Qwen3, and YaRN-scaled RoPE (Qwen2/Qwen3/Mistral style).

Each family: a tiny random transformers model (norm weights perturbed so that Gemma's 1 + w is really
tested), saved as safetensors and loaded by witscale; one packed row of several documents — sliding windows
of 4 that bite on the longer ones, Gemma-3's local and global RoPE, soft-caps small enough to matter — has,
document by document, transformers' logits for that document alone (≤ 1e-5, fp32). Then the export (the
HF writer, through ``to_hf_dict``) is read back by transformers with the same logits, and the pipeline's
blocks (pipeline.py), chained by hand, equal the dense model. tp/pp/ZeRO layouts of these families:
tests/test_families_parallel.py.
"""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from witscale.model import CausalLM, ModelConfig, init_weights, load_model_weights, packed_positions, save_hf_checkpoint
from witscale.model.family import family_spec
from witscale.model.hf_names import hf_to_pipe_name
from witscale.model.rope import rope_parameters
from witscale.model.shape import ModelShape

VOCAB = 97
WINDOW = 4
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
FAMILIES = {
    # head_dim 16 ≠ hidden/heads; scale from query_pre_attn_scalar; both soft-caps bite; layers 0, 2 sliding
    "gemma2": dict(model_type="gemma2", head_dim=16, query_pre_attn_scalar=12, sliding_window=WINDOW,
                   attn_logit_softcapping=3.0, final_logit_softcapping=2.0),
    # every 2nd layer global (HF's sliding_window_pattern), global RoPE linearly scaled, local base 1e4
    "gemma3_text": dict(model_type="gemma3_text", head_dim=16, sliding_window=WINDOW, sliding_window_pattern=2,
                        rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_theta=1e5,
                        final_logit_softcapping=4.0),
    # layers >= max_window_layers slide; q/k norms; untied
    "qwen3": dict(model_type="qwen3", head_dim=16, use_sliding_window=True, sliding_window=WINDOW,
                  max_window_layers=2),
    "qwen3-yarn-bias": dict(model_type="qwen3", head_dim=8, attention_bias=True, tie_word_embeddings=True,
                            rope_scaling=dict(YARN, beta_fast=16.0)),
    # the last layer slides (>= max_window_layers)
    "qwen2-yarn-window": dict(model_type="qwen2", rope_scaling=YARN, rope_theta=1e6, use_sliding_window=True,
                              sliding_window=WINDOW, max_window_layers=3),
    "mistral-yarn-mscale": dict(model_type="mistral", sliding_window=WINDOW,
                                rope_scaling=dict(YARN, mscale=1.0, mscale_all_dim=0.5, truncate=False)),
}
MULTIMODAL = "gemma3-multimodal"
ALTERNATING = [WINDOW, None, WINDOW, None]
EXPECTED_WINDOWS = {"gemma2": ALTERNATING, "gemma3_text": ALTERNATING, MULTIMODAL: ALTERNATING,
                    "qwen3": [None, None, WINDOW, WINDOW], "qwen3-yarn-bias": [None] * 4,
                    "qwen2-yarn-window": [None, None, None, WINDOW], "mistral-yarn-mscale": [WINDOW] * 4}
DOCS = [9, 3, 12]          # one packed row of three documents (two longer than the window) and a 2-token tail
ROW = 26


def _perturb(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _hf_model(family):
    torch.manual_seed(0)
    if family == MULTIMODAL:
        text = dict(BASE, head_dim=16, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"] * 2)
        vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      image_size=28, patch_size=14)
        cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
        model = transformers.Gemma3ForConditionalGeneration(cfg)
        model.config._attn_implementation = "eager"
        model.model.language_model.config._attn_implementation = "eager"
        return _perturb(model, 1)
    cfg = transformers.AutoConfig.for_model(**dict(BASE, **FAMILIES[family]))
    return _perturb(transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager"), 1)


def _logits(model, ids, lengths):
    pos, cu, max_len = packed_positions([lengths], ids.shape[1])
    with torch.no_grad():
        return model.compute_logits(model(ids, pos, cu, max_len))


@pytest.fixture(scope="module", params=sorted(FAMILIES) + [MULTIMODAL])
def family_case(request, tmp_path_factory):
    """(family, transformers model, its directory, witscale model loaded from it, config)."""
    hf = _hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    cfg = ModelConfig.from_hf_dir(str(path))
    ours = CausalLM(cfg).eval()
    load_model_weights(ours, cfg, model_dir=str(path), seed=0)
    return request.param, hf, path, ours, cfg


def test_packed_documents_match_transformers_run_alone(family_case):
    family, hf, _, ours, cfg = family_case
    torch.manual_seed(2)
    docs = [torch.randint(0, VOCAB, (n,)) for n in DOCS]
    ids = torch.cat(docs + [torch.zeros(ROW - sum(DOCS), dtype=torch.long)])[None]
    packed = _logits(ours, ids, DOCS)[0]
    start = 0
    with torch.no_grad():
        for d in docs:
            alone = hf(input_ids=d[None]).logits[0]
            torch.testing.assert_close(packed[start:start + len(d)], alone, rtol=0, atol=1e-5)
            start += len(d)
    # The family rules really are in force (a test that can fail for the right reason).
    spec = family_spec(cfg)
    assert [layer.sliding_window for layer in spec.layers] == EXPECTED_WINDOWS[family]
    if family.startswith("gemma"):
        assert spec.embed_scale == 32 ** 0.5 and spec.norm_offset == 1.0
    if family in ("gemma3_text", MULTIMODAL):
        assert len(spec.ropes) == 2 and cfg.model_type == "gemma3_text"
    if family == MULTIMODAL:
        assert cfg.checkpoint_layout == "gemma3_multimodal"
    if "yarn" in family:
        assert ours.model.rotary[0].attention_factor != 1.0


def test_export_loads_in_transformers_with_the_same_logits(family_case, tmp_path):
    family, hf, _, ours, cfg = family_case
    save_hf_checkpoint(ours.state_dict(), cfg, str(tmp_path / "out"))
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == cfg.model_type          # a multimodal source exports its text model
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), attn_implementation="eager").eval()
    reread = ModelConfig.from_hf_dir(str(tmp_path / "out")).to_hf_dict()
    assert {k: v for k, v in reread.items() if k != "torch_dtype"} == {
        k: v for k, v in cfg.to_hf_dict().items() if k != "torch_dtype"}
    torch.manual_seed(3)
    ids = torch.randint(0, VOCAB, (1, 14))
    with torch.no_grad():
        want = back(ids).logits
    torch.testing.assert_close(_logits(ours, ids, [14]), want, rtol=0, atol=1e-5)
    # Parameter counts: the model, transformers' text model and ModelShape (planner, MFU) agree.
    text = hf.model.language_model if family == MULTIMODAL else hf.model
    n_hf = sum(p.numel() for p in text.parameters()) + (0 if cfg.tie_word_embeddings else hf.lm_head.weight.numel())
    assert sum(p.numel() for p in ours.parameters()) == n_hf == ModelShape.from_config(cfg).total_params()
    assert ModelShape.from_config(written) == ModelShape.from_config(cfg)


def test_soft_capped_loss_equals_cross_entropy_of_transformers_logits(family_case):
    family, hf, _, ours, cfg = family_case
    if cfg.final_logit_softcapping is None:
        pytest.skip("no final soft-cap in this family's config")
    torch.manual_seed(4)
    ids = torch.randint(0, VOCAB, (1, 14))
    labels = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], dim=1)
    pos, cu, max_len = packed_positions([[14]], 14)
    stats = ours(ids, pos, cu, max_len, labels=labels, weights=torch.ones(1, 14))
    with torch.no_grad():
        want = F.cross_entropy(hf(ids).logits.double()[0, :-1], ids[0, 1:], reduction="sum")
    torch.testing.assert_close(stats.weighted_sum.double(), want, rtol=1e-5, atol=1e-5)


def test_pipeline_blocks_equal_the_dense_model(family_case):
    # The PipelineModule's blocks, chained by hand with the dense model's weights: same rules per layer.
    from witscale.model.pipeline import DecoderLayerPipe, EmbeddingPipe, FinalNormPipe, LMHeadPipe, TiedEmbeddingPipe

    family, _, _, ours, cfg = family_case
    n = cfg.num_hidden_layers
    blocks = ([TiedEmbeddingPipe(cfg, None) if cfg.tie_word_embeddings else EmbeddingPipe(cfg, None)]
              + [DecoderLayerPipe(cfg, None, "auto", i) for i in range(n)] + [FinalNormPipe(cfg)])
    head = blocks[0] if cfg.tie_word_embeddings else LMHeadPipe(cfg, None)
    modules = {str(i): b for i, b in enumerate(blocks)}
    modules[str(n + 2)] = head
    for name, value in ours.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        index, rest = hf_to_pipe_name(name, cfg).replace("tied_modules.embed.", "0.").split(".", 1)
        modules[index].get_parameter(rest).data.copy_(value)
    torch.manual_seed(5)
    ids = torch.randint(0, VOCAB, (1, ROW))
    pos, cu, _ = packed_positions([DOCS], ROW)
    with torch.no_grad():
        x = (ids, pos, cu)
        for block in blocks:
            x = block(x)
        got = head.lm_head(x)
    torch.testing.assert_close(got, _logits(ours, ids, DOCS), rtol=0, atol=1e-6)


def test_gemma_embedding_scale_is_rounded_to_the_model_dtype(family_case):
    family, hf, _, ours, cfg = family_case
    if not family.startswith("gemma"):
        pytest.skip("no embedding scale")
    from witscale.model.transformer import scale_embeddings

    ids = torch.arange(VOCAB)[None]
    text = hf.model.language_model if family == MULTIMODAL else hf.model
    with torch.no_grad():
        want = copy.deepcopy(text.embed_tokens).to(torch.bfloat16)(ids)     # √32 → 5.65625 in bf16
        got = scale_embeddings(ours.model.embed_tokens.weight.to(torch.bfloat16)[ids], ours.model.spec)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


# ---- the seeded init ---------------------------------------------------------------------------------------

def test_seeded_init_is_neutral_for_each_norm_style():
    for family, neutral in (("gemma2", 0.0), ("qwen3", 1.0)):
        cfg = ModelConfig.from_dict(dict(BASE, **FAMILIES[family]))
        model = CausalLM(cfg)
        init_weights(model, seed=0)
        norms = {n: p for n, p in model.named_parameters() if n.endswith("norm.weight")}
        assert len(norms) == 4 * cfg.num_hidden_layers + 1      # gemma2: 4 norms per layer; qwen3: 2 + q/k
        assert all(torch.all(p == neutral) for p in norms.values()), family


# ---- YaRN --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scaling", [
    dict(factor=4.0, original_max_position_embeddings=32),                                   # Qwen
    dict(factor=8.0, original_max_position_embeddings=16, beta_fast=16, beta_slow=2),
    dict(factor=40.0, original_max_position_embeddings=32, mscale=1.0, mscale_all_dim=1.0),   # DeepSeek style
    dict(factor=4.0, original_max_position_embeddings=32, mscale=1.0, mscale_all_dim=0.5, truncate=False),
    dict(factor=4.0, original_max_position_embeddings=32, attention_factor=1.25),
    dict(factor=None, original_max_position_embeddings=32),        # factor = max_position_embeddings / it
])
def test_yarn_equals_transformers(scaling):
    d = dict(BASE, model_type="qwen3", head_dim=32, max_position_embeddings=256, rope_theta=1e6,
             rope_scaling=dict(scaling, rope_type="yarn"))
    cfg = ModelConfig.from_dict(d)
    hf_cfg = transformers.AutoConfig.for_model(**d)
    want_freq, want_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, "cpu")
    freq, factor = rope_parameters(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    assert torch.equal(freq, want_freq) and factor == want_factor
    assert ModelConfig.from_dict(cfg.to_hf_dict()) == cfg


# ---- config ------------------------------------------------------------------------------------------------

def test_config_reads_each_family_as_transformers_does():
    gemma2 = ModelConfig.from_dict(dict(BASE, model_type="gemma2"))       # HF's defaults for absent keys
    hf = transformers.Gemma2Config.from_dict(dict(BASE, model_type="gemma2"))
    for key in ("head_dim", "query_pre_attn_scalar", "tie_word_embeddings", "layer_types", "sliding_window",
                "attn_logit_softcapping", "final_logit_softcapping", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(gemma2, key) == getattr(hf, key), key
    assert (gemma2.attn_logit_softcapping, gemma2.final_logit_softcapping) == (50.0, 30.0)
    assert gemma2.hidden_act == "gelu_pytorch_tanh"
    assert family_spec(gemma2).attn_softcap == 50.0 and family_spec(gemma2).final_softcap == 30.0
    uncapped = dict(BASE, model_type="gemma2", attn_logit_softcapping=None, final_logit_softcapping=None)
    for cfg in (ModelConfig.from_dict(uncapped), transformers.Gemma2Config.from_dict(uncapped)):
        assert (cfg.attn_logit_softcapping, cfg.final_logit_softcapping) == (None, None)   # null: no cap
    gemma3_text = ModelConfig.from_dict(dict(BASE, model_type="gemma3_text"))
    hf = transformers.Gemma3TextConfig.from_dict(dict(BASE, model_type="gemma3_text"))
    for key in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"):
        assert getattr(gemma3_text, key) == getattr(hf, key), key
    assert gemma3_text.final_logit_softcapping is None
    for model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text"):      # absent token ids
        ours, hf = ModelConfig.from_dict(dict(BASE, model_type=model_type)), transformers.AutoConfig.for_model(
            **dict(BASE, model_type=model_type))
        assert [getattr(ours, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")] == [
            getattr(hf, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")], model_type
    gemma3 = ModelConfig.from_dict(dict(BASE, model_type="gemma3_text", num_hidden_layers=12, rope_theta=1e6,
                                        rope_local_base_freq=1e4))         # transformers 4.x keys
    assert gemma3.layer_types.count("full_attention") == 2 and gemma3.layer_types[5] == "full_attention"
    assert (gemma3.rope_theta, gemma3.rope_local_base_freq) == (1e6, 1e4)
    qwen3 = ModelConfig.from_dict(dict(BASE, model_type="qwen3", sliding_window=8))
    assert qwen3.head_dim == 128 and qwen3.sliding_window is None and not qwen3.attention_bias
    assert ModelConfig.from_dict(dict(BASE, model_type="qwen3", attention_bias=True)).o_bias
    for family in FAMILIES:
        cfg = ModelConfig.from_dict(dict(BASE, **FAMILIES[family]))
        assert ModelConfig.from_dict(cfg.to_hf_dict()) == cfg, family


def test_multimodal_gemma3_text_config_defaults_are_transformers():
    # Hub configs of Gemma-3 4B+ list only the text fields that differ from the defaults.
    text = dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, sliding_window=1024,
                rope_scaling={"rope_type": "linear", "factor": 8.0}, model_type="gemma3_text")
    cfg = ModelConfig.from_dict({"model_type": "gemma3", "text_config": text, "vision_config": {}})
    hf = transformers.Gemma3Config(text_config=text).text_config
    for key in ("vocab_size", "num_attention_heads", "num_key_value_heads", "head_dim", "query_pre_attn_scalar",
                "max_position_embeddings", "sliding_window", "layer_types", "tie_word_embeddings"):
        assert getattr(cfg, key) == getattr(hf, key), key
    assert (cfg.rope_theta, cfg.rope_local_base_freq) == (hf.rope_parameters["full_attention"]["rope_theta"],
                                                         hf.rope_parameters["sliding_attention"]["rope_theta"])
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    shape = ModelShape.from_config({"model_type": "gemma3", "text_config": text})       # tools/plan.py --model DIR
    assert shape == ModelShape.from_config(cfg) and shape.total_params() == 3_880_263_168   # Gemma-3-4B's text model
    # The token ids: Gemma3TextConfig's defaults when absent (the hub's text_configs omit them) ...
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(cfg, key) == getattr(hf, key) is not None, key
        assert cfg.to_hf_dict()[key] == getattr(hf, key), key
    # ... and the outer config's where it has them (Gemma-3 4B-it: eos [1, 106], end of turn too).
    cfg = ModelConfig.from_dict({"model_type": "gemma3", "text_config": text, "eos_token_id": [1, 106],
                                 "pad_token_id": None})
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (2, [1, 106], 0)
    assert cfg.to_hf_dict()["eos_token_id"] == [1, 106]
    assert ModelConfig.from_dict(cfg.to_hf_dict()).eos_token_id == [1, 106]


@pytest.mark.parametrize("source", [
    # Qwen2.5 style: the window off, a sliding_window and max_window_layers that transformers ignores
    dict(model_type="qwen2", use_sliding_window=False, sliding_window=131072, max_window_layers=21),
    dict(model_type="qwen3", use_sliding_window=False, sliding_window=None, max_window_layers=2),
    dict(model_type="qwen3", max_window_layers=3),                                    # window off, key absent
    dict(model_type="qwen2", use_sliding_window=True, sliding_window=WINDOW, max_window_layers=3),
    dict(model_type="qwen3", use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
])
def test_qwen_export_keeps_max_window_layers_and_sliding_window(source):
    """transformers < 4.53 reads max_window_layers, not layer_types (a window on layers ≥ it when
    use_sliding_window): the export carries it, and sliding_window as read."""
    src = dict(BASE, **source)
    out = ModelConfig.from_dict(src).to_hf_dict()
    assert out["max_window_layers"] == source["max_window_layers"]
    assert out["sliding_window"] == source.get("sliding_window", 4096)
    assert ModelConfig.from_dict(out) == ModelConfig.from_dict(src)
    want = transformers.AutoConfig.for_model(**src).layer_types
    assert transformers.AutoConfig.for_model(**out).layer_types == want           # transformers ≥ 4.53
    old = ["sliding_attention" if out["use_sliding_window"] and out["sliding_window"] is not None
           and i >= out["max_window_layers"] else "full_attention" for i in range(BASE["num_hidden_layers"])]
    assert old == want                                                             # transformers 4.45 – 4.52


@pytest.mark.parametrize("change,message", [
    (dict(model_type="gemma3_text", attn_logit_softcapping=50.0), "attn_logit_softcapping is not applied by Gemma-3"),
    (dict(model_type="gemma2", use_bidirectional_attention=True), "use_bidirectional_attention=true is not supported"),
    (dict(model_type="gemma2", hidden_activation="gelu"), "hidden_activation 'gelu' is not supported"),
    (dict(model_type="gemma2", final_logit_softcapping=-1), "final_logit_softcapping must be a positive number"),
    (dict(model_type="gemma2", layer_types=["full_attention"]), "layer_types must list 4 entries"),
    (dict(model_type="qwen3", layer_types=["local"] * 4, use_sliding_window=True), "layer_types must list 4"),
    (dict(model_type="gemma3_text", rope_parameters={"sliding_attention": {"rope_type": "linear", "factor": 2.0},
                                                     "full_attention": {"rope_type": "default"}}),
     "only plain RoPE is supported on Gemma-3's sliding layers"),
    (dict(model_type="gemma3"), "model_type 'gemma3' needs a text_config"),
    (dict(model_type="gemma2", query_pre_attn_scalar=None), "query_pre_attn_scalar null is not supported"),
    (dict(model_type="gemma3_text", query_pre_attn_scalar=None), "query_pre_attn_scalar null is not supported"),
    (dict(model_type="qwen3", mlp_bias=True), "mlp_bias=true is not a qwen3 field"),
    (dict(model_type="qwen3", rope_scaling={"rope_type": "longrope", "factor": 2.0}), "'longrope' is not supported"),
    (dict(model_type="qwen3", rope_scaling={"rope_type": "yarn", "factor": 0}), "factor must be positive"),
])
def test_config_refuses_what_it_does_not_implement(change, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(dict(BASE, **change))
