"""--add-special-tokens (issue 22 item 3): the packer extends a tokenizer that lacks the template's special
tokens, keeps the extended tokenizer in the packed directory and records it; training grows a smaller model's
vocabulary (new rows: the mean of the old ones) and the logits of the old tokens do not change."""
import json
import os

import numpy as np
import pytest

from witscale.data.format import PackedDataset
from witscale.data.pack_cli import main as pack_main
from witscale.data.readers import normalize_record
from witscale.data.template_jinja import JINJA_TEMPLATES, hf_messages
from witscale.data.tokenizer import load_tokenizer

RECORDS = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 3."},
                         {"role": "assistant", "content": "It is 5."}]},
           {"messages": [{"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello."},
                         {"role": "user", "content": "Bye."}, {"role": "assistant", "content": "Goodbye."}]}]


def base_tokenizer_dir(path) -> str:
    """A tiny byte-level BPE fast tokenizer with only <s> and </s>: no chatml tokens (a 'base model's')."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    corpus = [json.dumps(RECORDS), "system user assistant Be brief. Add 2 and 3. It is 5. Hello."] * 4
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"],
                                                         show_progress=False,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>")
    hf.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def base_tok(tmp_path_factory):
    return base_tokenizer_dir(tmp_path_factory.mktemp("base_tok"))


def _write_records(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return str(path)


def _pack(tmp_path, tok, *extra, out="packed"):
    return pack_main(["--input", _write_records(tmp_path), "--tokenizer", tok, "--seq-len", "256", "--template",
                      "chatml", "--output", str(tmp_path / out), *extra])


def test_missing_special_token_refusal_suggests_the_flag(tmp_path, base_tok, capsys):
    assert _pack(tmp_path, base_tok) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "needs the special token '<|im_start|>'" in last and "--add-special-tokens" in last
    assert not (tmp_path / "packed").exists()


def test_pack_adds_the_templates_tokens_and_ids_equal_apply_chat_template(tmp_path, base_tok):
    base = load_tokenizer(base_tok)
    assert _pack(tmp_path, base_tok, "--add-special-tokens") == 0
    data = PackedDataset(str(tmp_path / "packed"))
    fp = data.manifest["tokenizer"]
    added = fp["added_tokens"]
    v = base.vocab_size
    assert added["tokens"] == [{"token": "<|im_start|>", "id": v}, {"token": "<|im_end|>", "id": v + 1}]
    assert added["base"] == base.fingerprint() and added["vocab_size"] == v + 2 == fp["vocab_size"]
    # the extended tokenizer travels in the packed directory, and is the one the manifest describes
    ext = load_tokenizer(str(tmp_path / "packed" / "tokenizer"))
    assert ext.fingerprint() == fp and ext.vocab_size == v + 2
    # the packed ids are what apply_chat_template renders with the extended tokenizer
    ext.hf.chat_template = JINJA_TEMPLATES["chatml"]
    lengths = data.doc_lengths(0)
    row = np.asarray(data[0].tokens)
    docs = np.split(row[:int(lengths.sum())], np.cumsum(lengths)[:-1])
    want = []
    for rec in RECORDS:
        messages, tools = hf_messages(normalize_record(rec, "messages"))
        out = ext.hf.apply_chat_template(messages, tools=tools, tokenize=True)
        want.append(list(out["input_ids"] if hasattr(out, "keys") else out))
    assert sorted(d.tolist() for d in docs) == sorted(want)
    assert any(v in w for w in want) and any(v + 1 in w for w in want)


def test_nothing_to_add_packs_as_without_the_flag(tmp_path, base_tok, capsys):
    assert _pack(tmp_path, base_tok, "--add-special-tokens", out="a") == 0
    packed = tmp_path / "a" / "tokenizer"
    # the extended tokenizer already has chatml's tokens: nothing added, the same bytes as without the flag
    assert pack_main(["--input", _write_records(tmp_path), "--tokenizer", str(packed), "--seq-len", "256",
                      "--template", "chatml", "--output", str(tmp_path / "b"), "--add-special-tokens"]) == 0
    assert "nothing added" in capsys.readouterr().err
    assert pack_main(["--input", _write_records(tmp_path), "--tokenizer", str(packed), "--seq-len", "256",
                      "--template", "chatml", "--output", str(tmp_path / "c")]) == 0
    for name in ("tokens.bin", "classes.bin"):
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "c" / name).read_bytes()


# ------------------------------------------------------------------------------------------- growing the model
def base_model_dir(path, vocab: int, tied: bool) -> str:
    """A tiny HF Llama of `vocab` tokens (random weights), saved as safetensors: the 'base model'."""
    import torch
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=tied, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(path))
    return str(path)


def _logits(model, ids):
    import torch
    b, s = ids.shape
    pos = torch.arange(s).repeat(b, 1)
    cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32)
    with torch.no_grad():
        return model.compute_logits(model(ids, pos, cu, s))


def _built(model_dir, vocab=None, grow_from=None):
    import dataclasses

    from witscale.model import CausalLM, ModelConfig, load_model_weights
    cfg = ModelConfig.from_json_file(os.path.join(model_dir, "config.json"))
    if vocab:
        cfg = dataclasses.replace(cfg, vocab_size=vocab)
    model = CausalLM(cfg).eval()
    load_model_weights(model, cfg, model_dir=model_dir, seed=0, grow_from=grow_from)
    return model


@pytest.mark.parametrize("tied", [False, True])
def test_grown_model_keeps_the_old_logits_and_new_rows_are_the_mean(tmp_path, tied):
    import torch
    old, new = 61, 64
    model_dir = base_model_dir(tmp_path / "base", old, tied)
    base, grown = _built(model_dir), _built(model_dir, vocab=new, grow_from=old)
    emb = grown.model.embed_tokens.weight
    assert emb.shape[0] == new
    heads = [emb] + ([] if tied else [grown.lm_head.weight])
    assert (grown.lm_head.weight is emb) == tied
    for w, w0 in zip(heads, [base.model.embed_tokens.weight, base.lm_head.weight]):
        assert torch.equal(w[:old], w0)
        torch.testing.assert_close(w[old:], w0.mean(0, keepdim=True).expand(new - old, -1), rtol=0, atol=1e-7)
    ids = torch.randint(0, old, (2, 12), generator=torch.Generator().manual_seed(1))
    got, want = _logits(grown, ids), _logits(base, ids)
    assert got.shape[-1] == new
    torch.testing.assert_close(got[..., :old], want, rtol=1e-6, atol=1e-6)


def test_a_checkpoint_of_another_vocabulary_is_refused_when_growing(tmp_path):
    from witscale.model.hf_io import CheckpointFormatError
    model_dir = base_model_dir(tmp_path / "base", 61, False)
    with pytest.raises(CheckpointFormatError, match="60-token vocabulary expects"):
        _built(model_dir, vocab=64, grow_from=60)


def _layout_worker(rank, world, model_dir, old, new, tp, pp, stage):
    """This rank's vocabulary shards after building the grown model in the layout: [(kind, vocab_start, rows)],
    gathered from ZeRO-3 partitions; plus, without pipeline stages, the full logits of a fixed batch."""
    import dataclasses

    import torch

    from tests.train_helpers import ds_config
    from witscale.model import ModelConfig
    from witscale.model.grow import _vocab_parameters
    from witscale.parallel.topology import ParallelDims, Topology
    from witscale.training.build import build_module
    from witscale.training.distributed import init_distributed

    init_distributed()
    cfg = dataclasses.replace(ModelConfig.from_json_file(os.path.join(model_dir, "config.json")), vocab_size=new)
    topo = Topology(ParallelDims(world, tp, pp, stage, cfg))
    module = build_module(cfg, topo, ds_config(stage, 1, 1, topo.dp), model_dir=model_dir, seed=0,
                          grow_vocab_from=old).eval()
    layers = list(_vocab_parameters(module))
    if stage == 3:
        import deepspeed
        with deepspeed.zero.GatheredParameters([p for _, p in layers]):
            return [(_kind(layer), layer.vocab_start, p.detach().clone().numpy()) for layer, p in layers], None
    shards = [(_kind(layer), layer.vocab_start, p.detach().clone().numpy()) for layer, p in layers]
    if pp > 1:
        return shards, None
    ids = torch.randint(0, old, (2, 12), generator=torch.Generator().manual_seed(1))
    return shards, _logits(module, ids).numpy()


def _kind(layer) -> str:
    from witscale.parallel.layers import VocabParallelLMHead
    return "head" if isinstance(layer, VocabParallelLMHead) else "embed"


LAYOUTS = {"tp2": (2, 1, 0, False), "zero3-dp2": (1, 1, 3, False), "pp2-tied": (1, 2, 1, True)}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_grown_model_in_every_layout_equals_one_rank(tmp_path, layout):
    """The mean comes from each rank's shard (or ZeRO-3 partition) summed and all-reduced: the same rows (and
    logits) as one rank. 61 → 63 tokens: tp=2 pads the vocabulary to 64 and the new rows sit on rank 1; a tied
    embedding's copy on the last pipeline stage grows as the first stage's does."""
    import torch

    from tests.distributed import run_distributed
    tp, pp, stage, tied = LAYOUTS[layout]
    old, new = 61, 63
    model_dir = base_model_dir(tmp_path / "base", old, tied)
    one = _built(model_dir, vocab=new, grow_from=old)
    out = run_distributed(_layout_worker, 2, model_dir, old, new, tp, pp, stage, timeout=600)
    dense = {"embed": one.model.embed_tokens.weight, "head": one.lm_head.weight}
    seen = 0
    for shards, _ in out:
        for kind, start, got in shards:
            got, want = torch.from_numpy(got), dense[kind][start:start + got.shape[0]]
            torch.testing.assert_close(got[:len(want)], want, rtol=1e-6, atol=1e-7, msg=f"{layout} {kind} {start}")
            assert not got[len(want):].any()          # padding rows stay zero
            seen += 1
    # tp2 / ZeRO-3: embedding and head on both ranks; pp2 tied: the embedding on stage 0, its copy on stage 1
    assert seen == {"tp2": 4, "zero3-dp2": 4, "pp2-tied": 2}[layout]
    if out[0][1] is not None:
        ids = torch.randint(0, old, (2, 12), generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(torch.from_numpy(out[0][1]), _logits(one, ids), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ the training checks, the export
@pytest.fixture(scope="module")
def packed_extended(tmp_path_factory, base_tok):
    """(packed dir with an extended tokenizer, base model dir holding the base tokenizer's files)."""
    import shutil
    tmp = tmp_path_factory.mktemp("packed_extended")
    assert _pack(tmp, base_tok, "--add-special-tokens") == 0
    model_dir = base_model_dir(tmp / "model", load_tokenizer(base_tok).vocab_size, False)
    for name in os.listdir(base_tok):
        shutil.copy(os.path.join(base_tok, name), model_dir)
    return str(tmp / "packed"), model_dir


def test_training_checks_accept_the_base_model_and_grow_its_config(packed_extended):
    from witscale.data.loader import (check_model_compat, check_tokenizer_identity, data_tokenizer_dir,
                                      grow_model_config)
    from witscale.model import ModelConfig
    packed, model_dir = packed_extended
    manifest = PackedDataset(packed).manifest
    cfg = ModelConfig.from_json_file(os.path.join(model_dir, "config.json"))
    check_model_compat(manifest, cfg, packed)                          # 322 > 320: no refusal
    grown, old = grow_model_config(manifest, cfg)
    assert (old, grown.vocab_size) == (cfg.vocab_size, cfg.vocab_size + 2)
    assert check_tokenizer_identity(manifest, model_dir) is None       # the base tokenizer: the data's, extended
    assert check_tokenizer_identity(manifest, os.path.join(packed, "tokenizer")) is None
    assert data_tokenizer_dir(packed) == os.path.join(packed, "tokenizer")
    # a model whose tokenizer is not the data's base is still refused, and so is a larger vocabulary without
    # the packer's record
    added = manifest["tokenizer"]["added_tokens"]
    other_base = dict(manifest, tokenizer=dict(manifest["tokenizer"], added_tokens=dict(
        added, base=dict(added["base"], digest="0" * 64))))
    with pytest.raises(ValueError, match="packed with another tokenizer"):
        check_tokenizer_identity(other_base, model_dir)
    plain = dict(manifest, tokenizer={k: v for k, v in manifest["tokenizer"].items() if k != "added_tokens"})
    with pytest.raises(ValueError, match="wrong tokenizer for this model"):
        check_model_compat(plain, cfg, packed)
    assert grow_model_config(plain, cfg) == (cfg, None)


def test_export_of_a_grown_model_round_trips_through_transformers(packed_extended, tmp_path):
    import torch
    import transformers

    from witscale.data.loader import data_tokenizer_dir
    from witscale.training.export import write_hf_dir
    packed, model_dir = packed_extended
    vocab = PackedDataset(packed).manifest["tokenizer"]["vocab_size"]
    grown = _built(model_dir, vocab=vocab, grow_from=vocab - 2)
    out = tmp_path / "hf"
    write_hf_dir(dict(grown.state_dict()), grown.config, str(out), data_tokenizer_dir(packed), dtype="fp32")
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert len(tok) == hf.config.vocab_size == vocab == hf.get_input_embeddings().weight.shape[0]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == vocab
    text = "<|im_start|>user\nAdd 2 and 3.<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert {vocab - 2, vocab - 1} <= set(ids)
    ids = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, _logits(grown, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_training_a_base_model_on_extended_data_grows_it_and_exports_the_extended_tokenizer(packed_extended,
                                                                                             tmp_path):
    """witscale/train.py end to end, one process: --model has the base vocabulary, the data the extended one."""
    import subprocess
    import sys

    import transformers

    from tests.conftest import REPO_ROOT
    packed, model_dir = packed_extended
    vocab = PackedDataset(packed).manifest["tokenizer"]["vocab_size"]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "witscale/train.py", "--ds_config", "ds_configs/zero1.json", "--data", packed,
                        "--model", model_dir, "--output-dir", str(tmp_path / "run"), "--micro-batch-size", "1",
                        "--grad-accum", "1", "--max-steps", "1", "--export-hf", str(tmp_path / "hf"),
                        "--export-dtype", "fp32"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    grew = [line for line in (r.stdout + r.stderr).splitlines() if "grew the vocabulary" in line]
    assert len(grew) == 1 and f"from {vocab - 2} to {vocab}: 2 new tokens, mean-initialised" in grew[0]
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert len(tok) == vocab == json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"]
    assert tok.convert_tokens_to_ids("<|im_start|>") == vocab - 2


def test_a_sentencepiece_model_is_refused_in_one_line(tmp_path):
    import subprocess
    import sys

    import sentencepiece as spm

    from tests.conftest import REPO_ROOT
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["some plain text"] * 10), vocab_size=300,
                                   model_prefix=str(tmp_path / "p"), byte_fallback=True, hard_vocab_limit=False,
                                   minloglevel=2)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "tools/pack_dataset.py", "--input", _write_records(tmp_path), "--tokenizer",
                        str(tmp_path / "p.model"), "--seq-len", "64", "--template", "chatml", "--output",
                        str(tmp_path / "out"), "--add-special-tokens"], cwd=REPO_ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "p.model: --add-special-tokens needs a Hugging Face tokenizer directory" in last, r.stderr
    assert not (tmp_path / "out").exists()
