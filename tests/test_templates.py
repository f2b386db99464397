import numpy as np
import pytest
import sentencepiece as spm

from witscale.data.classes import TokenClass as C
from witscale.data.errors import BoundaryError, TokenizerError
from witscale.data.readers import normalize_record
from witscale.data.render import Renderer
from witscale.data.templates import classify_tokens
from witscale.data.tokenizer import load_tokenizer

CHAT = {"messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Add 2 and 3."},
                     {"role": "assistant", "content": "5", "loss_weight": 0.5},
                     {"role": "user", "content": "Reverse the order: apple river"},
                     {"role": "assistant", "content": "river apple"}], "weight": 2}


def _sp(path):
    return spm.SentencePieceProcessor(model_file=path)


def _surfaces(sp, ids):
    """Each token's text, independently of our offsets (ASCII test data: no byte pieces)."""
    return [sp.id_to_piece(int(i)).replace("\u2581", " ") for i in ids]


@pytest.mark.parametrize("template", ["chatml", "llama3", "tulu"])
def test_classes_token_by_token(sp_model_path, sp_tokenizer, template):
    """Oracle: concatenate token surfaces, locate every message in the rendered text, and derive the class
    of each token from where its non-space characters fall."""
    conv = normalize_record(CHAT, "messages")
    r = Renderer(template, sp_tokenizer)
    doc = r(conv)
    sp = _sp(sp_model_path)
    specials = {sp.bos_id(): "<s>", sp.eos_id(): "</s>"}
    surf = [specials.get(int(i), s) for i, s in zip(doc.ids, _surfaces(sp, doc.ids))]
    text = "".join(surf)
    assert text == r.render_text(conv)            # no dummy prefix after specials; nothing lost
    expected_char = np.full(len(text), int(C.TEMPLATE))
    pos = 0
    for m in conv.messages:
        k = text.index(m.text, pos)
        expected_char[k:k + len(m.text)] = {"system": C.SYSTEM, "user": C.PROMPT, "assistant": C.RESPONSE}[m.role]
        pos = k + len(m.text)
    start = 0
    end_markers = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "tulu": "</s>"}[template]
    for tok, s, cls in zip(doc.ids, surf, doc.classes):
        span = range(start, start + len(s))
        start += len(s)
        chars = {int(expected_char[j]) for j in span if not text[j].isspace()}
        if s == end_markers:
            # end of turn: EOT after an assistant turn, template after user/system turns
            prev_role = "assistant" if text[:span.start].rstrip().endswith(("5", "river apple")) else "other"
            assert cls == (C.EOT if prev_role == "assistant" else C.TEMPLATE), s
        elif chars:
            assert chars == {int(cls)}, (s, cls)
        else:
            assert cls == C.TEMPLATE, (s, cls)
    # weights: record multiplier 2 × message weight (0.5 on the first answer), 1.0 where absent
    w = doc.weights
    assert set(np.round(w, 3).tolist()) == {1.0, 2.0}
    first_answer = np.nonzero(doc.classes == C.RESPONSE)[0][0]
    assert w[first_answer] == pytest.approx(1.0) and w[0] == pytest.approx(2.0)


def test_plain_is_the_papers_string(sp_model_path, sp_tokenizer):
    conv = normalize_record({"prompt": "Add 2 and 3.", "response": "The sum is 5."}, "prompt_response")
    doc = Renderer("plain", sp_tokenizer)(conv)
    sp = _sp(sp_model_path)
    # ids == tokenizing the rendered string "prompt response" with BOS/EOS added
    assert doc.ids.tolist() == sp.encode("Add 2 and 3. The sum is 5.", add_bos=True, add_eos=True)
    assert doc.classes[0] == C.TEMPLATE and doc.classes[-1] == C.EOT
    assert sp.decode(doc.ids[doc.classes == C.PROMPT].tolist()) == "Add 2 and 3."
    assert sp.decode(doc.ids[doc.classes == C.RESPONSE].tolist()) == "The sum is 5."
    assert doc.weights is None
    # prompt then response: classes never go back
    body = doc.classes[1:-1]
    assert (np.diff(body.astype(int)) >= 0).all()


def test_alpaca_template_classes(sp_model_path, sp_tokenizer):
    conv = normalize_record({"instruction": "Reverse the order.", "input": "apple river", "output": "river apple"},
                            "alpaca")
    r = Renderer("alpaca", sp_tokenizer)
    doc = r(conv)
    sp = _sp(sp_model_path)
    assert r.render_text(conv).startswith("<s>Below is an instruction that describes a task, paired with an input")
    # the rendered string (BOS/EOS as ids) tokenizes to the same ids
    body = r.render_text(conv)[len("<s>"):-len("</s>")]
    assert doc.ids.tolist() == sp.encode(body, add_bos=True, add_eos=True)
    prompt = sp.decode(doc.ids[doc.classes == C.PROMPT].tolist())
    assert prompt.replace(" ", "").replace("\n", "") == "Reversetheorder.appleriver"
    assert sp.decode(doc.ids[doc.classes == C.RESPONSE].tolist()) == "river apple"
    assert (doc.classes == C.EOT).sum() == 1 and doc.classes[-1] == C.EOT


def test_last_turn_only_demotes_earlier_answers(sp_tokenizer):
    conv = normalize_record(CHAT, "messages", last_turn_only=True)
    doc = Renderer("chatml", sp_tokenizer)(conv)
    assert (doc.classes == C.EOT).sum() == 1
    full = Renderer("chatml", sp_tokenizer)(normalize_record(CHAT, "messages"))
    assert (full.classes == C.EOT).sum() == 2
    assert (doc.classes == C.RESPONSE).sum() < (full.classes == C.RESPONSE).sum()


def test_boundary_inside_a_token_is_an_error(tmp_path, sp_tokenizer):
    """A tokenizer whose vocabulary holds ':\\nYes' merges the template's ':\\n' with the response."""
    import sentencepiece as s
    s.SentencePieceTrainer.train(sentence_iterator=iter(["### Response:\nYes it is"] * 20), model_prefix=str(tmp_path / "m"),
                                 vocab_size=300, model_type="bpe", byte_fallback=True, hard_vocab_limit=False,
                                 normalization_rule_name="identity", remove_extra_whitespaces=False,
                                 user_defined_symbols=[":\nYes"], minloglevel=2)
    tok = load_tokenizer(str(tmp_path / "m.model"))
    conv = normalize_record({"instruction": "Is it?", "output": "Yes it is"}, "alpaca")
    with pytest.raises(BoundaryError, match="spans classes template and response"):
        Renderer("alpaca", tok)(conv)
    Renderer("alpaca", sp_tokenizer)(conv)   # control: without that piece the record renders


def test_classify_tokens_rules():
    text = "ab cd"
    cls = np.array([3, 3, 1, 4, 4], dtype=np.uint8)
    msg = np.zeros(5, dtype=np.int64)
    # " c" (space of the template + response char) → response; empty span → class of its position
    got, _ = classify_tokens(text, cls, msg, np.array([0, 2, 4, 0]), np.array([2, 4, 5, 0]))
    assert got.tolist() == [3, 4, 4, 3]
    with pytest.raises(BoundaryError):
        classify_tokens(text, cls, msg, np.array([1]), np.array([4]))


def test_missing_special_token_is_named(tmp_path):
    import sentencepiece as s
    s.SentencePieceTrainer.train(sentence_iterator=iter(["plain text only"] * 10), model_prefix=str(tmp_path / "p"),
                                 vocab_size=300, model_type="bpe", byte_fallback=True, hard_vocab_limit=False,
                                 minloglevel=2)
    tok = load_tokenizer(str(tmp_path / "p.model"))
    with pytest.raises(TokenizerError, match="<\\|im_start\\|>"):
        Renderer("chatml", tok)
    with pytest.raises(Exception, match="known templates"):
        Renderer("nope", tok)


def test_hf_template_segmentwise(tmp_path, sp_tokenizer):
    """A local HF fast tokenizer with a ChatML chat_template: classes as with our chatml template."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = "Be brief . Add 2 and 3 5 Reverse the order : apple river system user assistant".split()
    vocab = {w: i for i, w in enumerate(["[UNK]", "<|im_start|>", "<|im_end|>", "\n", " "] + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(" |\n|\\.|:"), behavior="isolated")
    hf = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="<|im_end|>",
                                 additional_special_tokens=["<|im_start|>"])
    hf.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
                        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    hf.save_pretrained(str(tmp_path / "hf"))
    tok = load_tokenizer(str(tmp_path / "hf"))
    assert tok.kind == "hf" and tok.fingerprint()["vocab_size"] == len(vocab)
    conv = normalize_record(CHAT, "messages")
    doc = Renderer("hf", tok)(conv)
    pieces = tok.vocabulary()
    by_class = {c: "".join(pieces[i] for i in doc.ids[doc.classes == c]) for c in C}
    assert by_class[C.SYSTEM] == "Be brief."
    assert by_class[C.PROMPT] == "Add 2 and 3.Reverse the order: apple river"
    assert by_class[C.RESPONSE] == "5river apple"
    assert by_class[C.EOT] == "<|im_end|><|im_end|>"
