"""One record per model family (witscale/model/family.py ``Family``): adding a Llama-like family is one record.

A toy family, ``toy_llama``, is registered from this file alone (no other file changed): on the witscale side
one ``Family`` record, on the transformers side a renamed Llama (its own model_type, config and model classes,
with other defaults for head_dim and tied embeddings). witscale then reads its config.json, builds the model,
loads transformers' weights, matches its logits and loss, exports a checkpoint that transformers loads as a
``ToyLlamaForCausalLM`` with the same weights, and counts its parameters and FLOPs from the record's defaults.
An unregistered family is refused in one line naming the config file and the supported families, by
ModelConfig, ModelShape and tools/plan.py alike. Every registered record holds transformers' defaults.
"""
import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers
from huggingface_hub.dataclasses import strict

from witscale.model import CausalLM, ModelConfig, load_model_weights, packed_positions, save_hf_checkpoint
from witscale.model import family as family_mod
from witscale.model.family import FAMILIES, Family, family_spec, register_family
from witscale.model.shape import ModelShape

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 61
# No head_dim and no tie_word_embeddings: the toy family's defaults (16 ≠ hidden/heads = 8; tied) apply.
TOY_CONFIG = dict(model_type="toy_llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=40,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  attention_bias=True, mlp_bias=True, rms_norm_eps=1e-6)
DOCS, ROW = [7, 4, 9], 22

# ---- the toy family: one record here, and a renamed Llama in transformers ----------------------------------

TOY = Family(model_type="toy_llama", architecture="ToyLlamaForCausalLM", title="ToyLlama",
             default_head_dim=16, default_tie_word_embeddings=True)


@strict
class ToyLlamaConfig(transformers.LlamaConfig):
    model_type = "toy_llama"
    head_dim: int | None = 16
    tie_word_embeddings: bool = True


class ToyLlamaForCausalLM(transformers.LlamaForCausalLM):
    config_class = ToyLlamaConfig


@pytest.fixture
def toy_family():
    transformers.AutoConfig.register("toy_llama", ToyLlamaConfig, exist_ok=True)
    transformers.AutoModelForCausalLM.register(ToyLlamaConfig, ToyLlamaForCausalLM, exist_ok=True)
    register_family(TOY)
    yield TOY
    del FAMILIES[TOY.model_type]


def _toy_hf_model():
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**TOY_CONFIG),
                                                          attn_implementation="eager")
    with torch.no_grad():                  # biases and norms away from their init, so that they are tested
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _network(cfg: ModelConfig) -> dict:
    """The fields that decide the network (not the other keys carried to the export, nor the dtype)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("extra", "torch_dtype")}


def _logits(model, ids, lengths):
    pos, cu, max_len = packed_positions([lengths], ids.shape[1])
    with torch.no_grad():
        return model.compute_logits(model(ids, pos, cu, max_len))


def test_a_llama_like_family_is_one_record(toy_family, tmp_path):
    hf = _toy_hf_model()
    assert type(hf) is ToyLlamaForCausalLM and hf.config.head_dim == 16 and hf.config.tie_word_embeddings
    hf.save_pretrained(tmp_path / "hf")
    cfg = ModelConfig.from_hf_dir(str(tmp_path / "hf"))
    # The record's defaults are what transformers assumed for the keys the source leaves out.
    assert _network(ModelConfig.from_dict(TOY_CONFIG)) == _network(cfg)
    assert (cfg.head_dim, cfg.tie_word_embeddings, cfg.o_bias, cfg.mlp_bias) == (16, True, True, True)

    ours = CausalLM(cfg).eval()
    load_model_weights(ours, cfg, model_dir=str(tmp_path / "hf"), seed=0)
    torch.manual_seed(1)
    docs = [torch.randint(0, VOCAB, (n,)) for n in DOCS]
    ids = torch.cat(docs + [torch.zeros(ROW - sum(DOCS), dtype=torch.long)])[None]
    packed, start = _logits(ours, ids, DOCS)[0], 0
    with torch.no_grad():
        for d in docs:                     # each packed document as transformers sees it alone
            torch.testing.assert_close(packed[start:start + len(d)], hf(input_ids=d[None]).logits[0],
                                       rtol=0, atol=1e-5)
            start += len(d)
    # The fused weighted loss (one document, weights 1) is transformers' cross-entropy.
    doc = docs[2][None]
    labels = torch.cat([doc[:, 1:], torch.full((1, 1), -100)], dim=1)
    pos, cu, max_len = packed_positions([[doc.shape[1]]], doc.shape[1])
    stats = ours(doc, pos, cu, max_len, labels=labels, weights=torch.ones(doc.shape))
    with torch.no_grad():
        want = F.cross_entropy(hf(doc).logits.double()[0, :-1], doc[0, 1:], reduction="sum")
    torch.testing.assert_close(stats.weighted_sum.double(), want, rtol=1e-5, atol=1e-5)

    # Export: transformers loads it as the toy family's class, with the same weights.
    save_hf_checkpoint(ours.state_dict(), cfg, str(tmp_path / "out"))
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == "toy_llama" and written["architectures"] == ["ToyLlamaForCausalLM"]
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), attn_implementation="eager")
    assert type(back) is ToyLlamaForCausalLM
    want_state = hf.state_dict()
    assert back.state_dict().keys() == want_state.keys()
    for name, value in back.state_dict().items():
        assert torch.equal(value, want_state[name]), name
    assert ModelConfig.from_hf_dir(str(tmp_path / "out")) == cfg

    # Shape and FLOPs from the record: a config.json without head_dim / tie_word_embeddings is counted with
    # the family's defaults (head_dim 16, one embedding matrix), as transformers builds it.
    shape = ModelShape.from_config(TOY_CONFIG)
    assert shape == ModelShape.from_config(cfg) and shape.hd == 16 and shape.tie_word_embeddings
    n_hf = sum(p.numel() for p in hf.parameters())          # tied: the LM head is the embedding
    assert shape.total_params() == n_hf == sum(p.numel() for p in ours.parameters())
    # Matmul weights per token: every projection (with its column-parallel biases) and the LM head.
    matmul = sum(p.numel() for n, p in hf.named_parameters()
                 if ".layers." in n and "norm" not in n and not n.endswith(("o_proj.bias", "down_proj.bias")))
    matmul += VOCAB * TOY_CONFIG["hidden_size"]
    lengths = torch.tensor(DOCS, dtype=torch.float64)
    flops = shape.training_flops(float(lengths.sum()), float((lengths ** 2).sum()))
    d_attn = TOY_CONFIG["num_attention_heads"] * 16
    assert flops == 6.0 * matmul * sum(DOCS) + 6.0 * TOY_CONFIG["num_hidden_layers"] * d_attn * sum(
        n * n for n in DOCS)
    # Llama's record (head_dim = hidden/heads, untied) counts the same dict differently: the record decides.
    as_llama = ModelShape.from_config(dict(TOY_CONFIG, model_type="llama"))
    assert as_llama.hd == 8 and as_llama.total_params() != shape.total_params()


# ---- refusals ------------------------------------------------------------------------------------------------

def test_an_unknown_family_is_refused_in_one_line_naming_the_file_and_the_families(tmp_path):
    assert "toy_llama" not in FAMILIES
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TOY_CONFIG))
    with pytest.raises(ValueError) as e:
        ModelConfig.from_hf_dir(str(tmp_path))
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{path}: model_type 'toy_llama' is not supported")
    assert all(name in message for name in FAMILIES), message
    # The shape (planner, MFU) refuses it too, instead of counting it as a Llama.
    with pytest.raises(ValueError, match="model_type 'toy_llama' is not supported"):
        ModelShape.from_config(TOY_CONFIG)
    out = subprocess.run([sys.executable, "tools/plan.py", "--model", str(path), "--gpus", "8"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "is not supported (supported: llama" in lines[0]


def test_a_record_is_registered_once_and_names_its_rules():
    with pytest.raises(ValueError, match="model_type 'llama' is already registered"):
        register_family(Family("llama", "LlamaForCausalLM"))
    with pytest.raises(ValueError, match="windows must be one of"):
        Family("toy", "ToyForCausalLM", windows="sometimes")


def test_no_module_tests_model_type_itself():
    """Every family decision reads the record: only family.py may compare a model_type."""
    pattern = re.compile(r"model_type\s*(==|!=|\bin\b|\bnot in\b)|\b(SUPPORTED|GEMMA)\b\s*(\)|$|,)")
    found = []
    for root, _, files in os.walk(os.path.join(REPO, "witscale")):
        for name in files:
            path = os.path.join(root, name)
            if name.endswith(".py") and path != family_mod.__file__:
                with open(path, encoding="utf-8") as f:
                    found += [f"{os.path.relpath(path, REPO)}:{i}: {line.strip()}"
                              for i, line in enumerate(f, 1) if pattern.search(line)]
    assert not found, "\n".join(found)


# ---- every record holds transformers' defaults ---------------------------------------------------------------

@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_record_holds_transformers_defaults(model_type):
    family = FAMILIES[model_type]
    keys = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=48, num_hidden_layers=12,
                num_attention_heads=32)
    windowed = dict(keys, use_sliding_window=True) if family.windows == "from_layer" else keys
    hf = transformers.AutoConfig.for_model(model_type, **windowed)
    ours = ModelConfig.from_dict(dict(windowed, model_type=model_type))
    assert getattr(transformers, family.architecture).config_class.model_type == model_type
    assert ours.num_key_value_heads == hf.num_key_value_heads == (family.default_kv_heads or 32)
    assert ours.head_dim == (getattr(hf, "head_dim", None) or 2) == (family.default_head_dim or 2)
    assert ours.tie_word_embeddings == hf.tie_word_embeddings == family.default_tie_word_embeddings
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == family.default_token_ids
    assert getattr(hf, family.activation_key) == family.default_activation == ours.hidden_act
    rope = hf.rope_parameters
    assert ours.rope_theta == rope.get("full_attention", rope)["rope_theta"] == family.default_rope_theta
    if family.local_rope_theta is not None:
        assert ours.rope_local_base_freq == rope["sliding_attention"]["rope_theta"] == family.local_rope_theta
    assert ours.query_pre_attn_scalar == getattr(hf, "query_pre_attn_scalar", None)
    if family.reads_softcaps:
        assert (hf.attn_logit_softcapping, hf.final_logit_softcapping) == family.default_softcaps
    if family.windows != "none":
        assert hf.sliding_window == family.default_window
    if getattr(hf, "layer_types", None) is not None:
        assert [ours.layer_type(i) for i in range(12)] == hf.layer_types
    spec = family_spec(ours)
    assert (spec.qk_norm, spec.sandwich_norms, spec.norm_offset) == (
        family.qk_norm, family.sandwich_norms, family.norm_offset)
