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
