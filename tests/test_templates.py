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


# ------------------------------------------------------------------------------------ tools and reasoning
import json  # noqa: E402

from tests.test_readers import OPENAI_TOOLS, SHAREGPT_TOOLS, WEATHER_TOOL  # noqa: E402
from witscale.data.classes import RESPONSE_SIDE  # noqa: E402
from witscale.data.errors import RecordError  # noqa: E402

RS, TC, TL, T, S, P, R, E = C.REASONING, C.TOOL_CALL, C.TOOL, C.TEMPLATE, C.SYSTEM, C.PROMPT, C.RESPONSE, C.EOT

# call → result → answer, with a system prompt, tool schemas and a reasoning trace before the call
TOOL_CHAT = {"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Weather in Paris?"},
                          {"role": "assistant", "content": "<think>\nI should call get_weather.\n</think>\n\n",
                           "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                                             "arguments": "{\"city\": \"Paris\"}"}}]},
                          {"role": "tool", "name": "get_weather", "content": "{\"temp\": 21}"},
                          {"role": "assistant", "content": "It is 21 degrees in Paris."}],
             "tools": [WEATHER_TOOL]}


def _sp_surfaces(sp, ids):
    """Each token's text from the SentencePiece model itself (▁ → space, <0xNN> → the byte; ASCII data)."""
    out = []
    for i in ids:
        piece = sp.id_to_piece(int(i))
        if sp.is_byte(int(i)):
            piece = chr(int(piece[3:5], 16))
        out.append(piece.replace("\u2581", " "))
    return out


def _check_classes(surfaces, classes, text, spans):
    """Oracle: locate each (substring, class) of `spans` in order in the rendered text (the rest is template);
    every token's non-space characters must all have its class; a token of spaces only takes the class of
    the character where it starts. SentencePiece's dummy prefix after a leading BOS covers no character."""
    surfaces = list(surfaces)
    if len(surfaces) > 1 and surfaces[1].startswith(" ") and not text[len(surfaces[0]):].startswith(" "):
        surfaces[1] = surfaces[1][1:]
    assert "".join(surfaces) == text
    expected = np.full(len(text), int(T))
    pos = 0
    for piece, cls in spans:
        k = text.index(piece, pos)
        expected[k:k + len(piece)] = cls
        pos = k + len(piece)
    start = 0
    for s, cls in zip(surfaces, classes):
        span = range(start, start + len(s))
        start += len(s)
        chars = {int(expected[j]) for j in span if not text[j].isspace()}
        if chars:
            assert chars == {int(cls)}, (s, C(int(cls)).name, [C(c).name for c in chars])
        elif len(s):
            assert int(cls) == int(expected[span.start]), (s, C(int(cls)).name)


def test_chatml_tool_conversation_token_by_token(sp_model_path, sp_tokenizer):
    conv = normalize_record(TOOL_CHAT, "messages")
    r = Renderer("chatml", sp_tokenizer)
    doc = r(conv)
    text = r.render_text(conv)
    assert text == (
        "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions to assist with the user query."
        "\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + json.dumps(WEATHER_TOOL) + "\n</tools>\n\nFor each function call, return a json object with function name "
        "and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
        "\"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n"
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nI should call get_weather.\n</think>\n\n"
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n{\"temp\": 21}\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nIt is 21 degrees in Paris.<|im_end|>\n")
    spans = [("Be brief.", S), (json.dumps(WEATHER_TOOL), S), ("Weather in Paris?", P),
             ("<think>\nI should call get_weather.\n</think>\n\n", RS),
             ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', TC),
             ("<|im_end|>", E), ('{"temp": 21}', TL), ("It is 21 degrees in Paris.", R), ("<|im_end|>", E)]
    _check_classes(_sp_surfaces(_sp(sp_model_path), doc.ids), doc.classes, text, spans)
    assert set(np.unique(doc.classes).tolist()) == {T, S, P, R, E, RS, TC, TL}


def test_llama3_tool_conversation_token_by_token(sp_model_path, sp_tokenizer):
    conv = normalize_record(TOOL_CHAT, "messages")
    r = Renderer("llama3", sp_tokenizer)
    doc = r(conv)
    text = r.render_text(conv)
    schema = json.dumps(WEATHER_TOOL, indent=4)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n\n"
                           "You have access to the following functions.")
    assert ("<|start_header_id|>assistant<|end_header_id|>\n\n<think>\nI should call get_weather.\n</think>\n\n"
            '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'
            '<|start_header_id|>ipython<|end_header_id|>\n\n{"temp": 21}<|eot_id|>') in text
    spans = [(schema, S), ("Be brief.", S), ("Weather in Paris?", P), ("<think>\nI should call get_weather.\n</think>\n\n", RS),
             ('{"name": "get_weather", "parameters": {"city": "Paris"}}', TC), ("<|eot_id|>", E), ('{"temp": 21}', TL),
             ("It is 21 degrees in Paris.", R), ("<|eot_id|>", E)]
    _check_classes(_sp_surfaces(_sp(sp_model_path), doc.ids), doc.classes, text, spans)


@pytest.mark.parametrize("template", ["plain", "alpaca", "tulu", "chatml", "llama3"])
def test_reasoning_and_answer(sp_model_path, sp_tokenizer, template):
    """Every fixed template renders the reasoning as <think>\\n…\\n</think>\\n\\n before the answer."""
    rec = {"messages": [{"role": "user", "content": "Add 2 and 3."},
                        {"role": "assistant", "content": [{"type": "reasoning", "text": "Two plus three is five."},
                                                          {"type": "text", "text": "The sum is 5."}]}]}
    conv = normalize_record(rec, "messages")
    r = Renderer(template, sp_tokenizer)
    doc = r(conv)
    text = r.render_text(conv)
    assert "<think>\nTwo plus three is five.\n</think>\n\nThe sum is 5." in text
    end = {"plain": "</s>", "alpaca": "</s>", "tulu": "</s>", "chatml": "<|im_end|>", "llama3": "<|eot_id|>"}[template]
    # plain: the joining space is response-side by the paper's rule (here: the reasoning's first token)
    think = (" " if template == "plain" else "") + "<think>\nTwo plus three is five.\n</think>\n\n"
    spans = [("Add 2 and 3.", P), (think, RS), ("The sum is 5.", R), (end, E)]
    _check_classes(_sp_surfaces(_sp(sp_model_path), doc.ids), doc.classes, text, spans)
    # --last-turn-only with two answers: the first one's reasoning is prompt-side too
    two = {"messages": rec["messages"] + [{"role": "user", "content": "And 1?"},
                                          {"role": "assistant", "content": "<think>one</think>1"}]}
    doc = r(normalize_record(two, "messages", last_turn_only=True))
    reasoning = _sp(sp_model_path).decode(doc.ids[doc.classes == RS].tolist())
    assert "one" in reasoning and "five" not in reasoning
    assert "five" in _sp(sp_model_path).decode(doc.ids[doc.classes == P].tolist())


@pytest.mark.parametrize("template", ["plain", "alpaca", "tulu"])
def test_templates_without_tools_refuse_tool_records(sp_tokenizer, template):
    with pytest.raises(RecordError) as e:
        Renderer(template, sp_tokenizer)(normalize_record(SHAREGPT_TOOLS, "sharegpt"))
    assert str(e.value) == (f"template '{template}' cannot express tools (the record has tool calls, tool results, "
                            f"tools); use --template chatml, llama3 or hf")
    schemas_only = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                    "tools": [WEATHER_TOOL]}
    with pytest.raises(RecordError, match=r"\(the record has tools\)"):
        Renderer(template, sp_tokenizer)(normalize_record(schemas_only, "messages"))


def test_llama3_refuses_what_llama_3_1_cannot_express(sp_tokenizer):
    r = Renderer("llama3", sp_tokenizer)
    with pytest.raises(RecordError, match="message 2: template 'llama3' expresses one tool call per assistant message"):
        r(normalize_record(OPENAI_TOOLS, "messages"))
    both = json.loads(json.dumps(TOOL_CHAT))
    both["messages"][2]["content"] = "Let me check."
    with pytest.raises(RecordError, match="message 3: template 'llama3' cannot express text and a tool call"):
        r(normalize_record(both, "messages"))
    Renderer("chatml", sp_tokenizer)(normalize_record(both, "messages"))     # chatml can


def test_chatml_parallel_calls_and_grouped_results(sp_tokenizer):
    r = Renderer("chatml", sp_tokenizer)
    text = r.render_text(normalize_record(OPENAI_TOOLS, "messages"))
    assert ("<|im_start|>assistant\n<think>\nTwo cities: two calls.\n</think>\n\n<tool_call>\n{\"name\": \"get_weather\", "
            "\"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": "
            "{\"city\": \"Rome\"}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n21\n</tool_response>\n"
            "<tool_response>\n{\"temp\": 25}\n</tool_response><|im_end|>\n") in text


# ------------------------------------------------------------------------------------ plain: the paper's boundary
@pytest.fixture(scope="module")
def split_digits_model(tmp_path_factory, synthetic_records):
    """Like LLaMA-2's tokenizer: digits split, byte fallback, so ' 5' and ' 😀' start with a lone '▁'."""
    import sentencepiece as s
    out = tmp_path_factory.mktemp("spd")
    texts = [r.get("instruction", "") + " " + r.get("output", "") for r in synthetic_records if "instruction" in r]
    s.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(out / "m"), vocab_size=500,
                                 model_type="bpe", byte_fallback=True, split_digits=True, hard_vocab_limit=False,
                                 normalization_rule_name="identity", remove_extra_whitespaces=False, unk_id=0,
                                 bos_id=1, eos_id=2, pad_id=3, minloglevel=2)
    return str(out / "m.model")


PROMPT = "What is 498 plus 287?"


@pytest.mark.parametrize("model", ["conftest", "split_digits"])
@pytest.mark.parametrize("response", ["785 is the sum.", "\U0001F600 785", "The sum is 785."])
def test_plain_boundary_is_the_papers_rule(sp_model_path, split_digits_model, model, response):
    """The paper's code: prompt tokens = tokenization of the prompt alone, BOS included; every later token of
    'BOS prompt response EOS' (joined by a space) is weighted λr."""
    path = sp_model_path if model == "conftest" else split_digits_model
    sp = _sp(path)
    n_prompt = len(sp.encode(PROMPT, add_bos=True))
    full = sp.encode(PROMPT + " " + response, add_bos=True, add_eos=True)
    doc = Renderer("plain", load_tokenizer(path))(normalize_record({"prompt": PROMPT, "response": response},
                                                                    "prompt_response"))
    assert doc.ids.tolist() == full
    response_side = np.isin(doc.classes, [int(c) for c in RESPONSE_SIDE])
    assert response_side.tolist() == [j >= n_prompt for j in range(len(full))]
    assert doc.classes[0] == T and doc.classes[-1] == E
    assert set(doc.classes[1:n_prompt].tolist()) == {P} and set(doc.classes[n_prompt:-1].tolist()) == {R}
    # the cases the rule is about: the joining space is a token of its own (a digit with split digits, an emoji)
    lone_space = sp.id_to_piece(full[n_prompt]) == "\u2581"
    if response[0] == "\U0001F600" or (model == "split_digits" and response[0].isdigit()):
        assert lone_space
    if response[0].isalpha():
        assert not lone_space


def test_plain_boundary_multi_turn(split_digits_model):
    """Every user → assistant boundary: tokens from len(tokenize(everything before the joining space)) to the end
    of the answer are response-side."""
    rec = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 3."},
                        {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 4 and 4?"},
                        {"role": "assistant", "content": "8"}]}
    sp = _sp(split_digits_model)
    doc = Renderer("plain", load_tokenizer(split_digits_model))(normalize_record(rec, "messages"))
    text = "Be brief.\n\nAdd 2 and 3. 5\nAnd 4 and 4? 8"
    assert doc.ids.tolist() == sp.encode(text, add_bos=True, add_eos=True)
    b1 = len(sp.encode("Be brief.\n\nAdd 2 and 3.", add_bos=True))
    e1 = len(sp.encode("Be brief.\n\nAdd 2 and 3. 5", add_bos=True))
    b2 = len(sp.encode("Be brief.\n\nAdd 2 and 3. 5\nAnd 4 and 4?", add_bos=True))
    expected = [(b1 <= j < e1) or j >= b2 for j in range(len(doc.ids))]
    assert np.isin(doc.classes, [int(c) for c in RESPONSE_SIDE]).tolist() == expected
    assert sp.id_to_piece(int(doc.ids[b1])) == "\u2581" and doc.classes[b1] == R


# ------------------------------------------------------------------------------------ hf: chat templates with tools
# Qwen2.5/Qwen3's tool rendering (reasoning_content rendered on every assistant turn): the same text as our chatml
QWEN_LIKE = r"""
{%- if tools %}
{{- '<|im_start|>system\n' }}
{%- if messages and messages[0].role == 'system' %}{{- messages[0].content + '\n\n' }}{%- endif %}
{{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
{%- for tool in tools %}{{- "\n" }}{{- tool | tojson }}{%- endfor %}
{{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- elif messages and messages[0].role == 'system' %}
{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'user' %}
{{- '<|im_start|>user\n' + message.content + '<|im_end|>\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant\n' }}
{%- if message.reasoning_content is defined and message.reasoning_content is not none %}{{- '<think>\n' + message.reasoning_content + '\n</think>\n\n' }}{%- endif %}
{{- message.content }}
{%- if message.tool_calls %}
{%- for tool_call in message.tool_calls %}
{%- if (loop.first and message.content) or (not loop.first) %}{{- '\n' }}{%- endif %}
{%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- '<tool_call>\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}
{%- if tool_call.arguments is string %}{{- tool_call.arguments }}{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}
{{- '}\n</tool_call>' }}
{%- endfor %}
{%- endif %}
{{- '<|im_end|>\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.first or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}
{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""

# Llama 3.1's tool rendering, condensed from its chat_template: tools in the first user message (raises without
# one), a single JSON call per turn (its text dropped), tool results through tojson, messages trimmed
LLAMA31_LIKE = r"""
{{- bos_token }}
{%- if not tools is defined %}{%- set tools = none %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}{%- set messages = messages[1:] %}{%- else %}{%- set system_message = "" %}{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}{{- "Environment: ipython\n" }}{%- endif %}
{{- "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n" }}
{{- system_message + "<|eot_id|>" }}
{%- if tools is not none %}
{%- if messages | length != 0 %}{%- set first_user_message = messages[0]['content']|trim %}{%- set messages = messages[1:] %}
{%- else %}{{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}{%- endif %}
{{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
{{- "Given the following functions, please respond with a JSON for a function call with its proper arguments that best answers the given prompt.\n\n" }}
{{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.Do not use variables.\n\n' }}
{%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\n\n" }}{%- endfor %}
{{- first_user_message + "<|eot_id|>"}}
{%- endif %}
{%- for message in messages %}
{%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- elif 'tool_calls' in message %}
{%- if not message.tool_calls|length == 1 %}{{- raise_exception("This model only supports single tool-calls at once!") }}{%- endif %}
{%- set tool_call = message.tool_calls[0].function %}
{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
{{- '{"name": "' + tool_call.name + '", "parameters": ' }}{{- tool_call.arguments | tojson }}{{- "}<|eot_id|>" }}
{%- elif message.role == "tool" or message.role == "ipython" %}
{{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
{%- if message.content is mapping or message.content is iterable %}{{- message.content | tojson }}{%- else %}{{- message.content }}{%- endif %}
{{- "<|eot_id|>" }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}
"""

HF_SPECIALS = ["<|begin_of_text|>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>",
               "<|eot_id|>", "<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]


@pytest.fixture(scope="module")
def hf_tool_tokenizers(tmp_path_factory):
    """A byte-level BPE fast tokenizer (trained here) with Qwen's and Llama 3's specials, saved twice: with the
    Qwen-like and with the Llama-3.1-like chat_template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    corpus = [json.dumps(TOOL_CHAT), json.dumps(OPENAI_TOOLS), "Be brief. Weather in Paris? It is 21 degrees."] * 4
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=HF_SPECIALS, show_progress=False,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out = {}
    for name, template, eos in (("qwen", QWEN_LIKE, "<|im_end|>"), ("llama31", LLAMA31_LIKE, "<|eot_id|>")):
        hf = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|begin_of_text|>", eos_token=eos,
                                     additional_special_tokens=[t for t in HF_SPECIALS if t not in (eos, "<|begin_of_text|>")])
        hf.chat_template = template
        path = str(tmp_path_factory.mktemp(name))
        hf.save_pretrained(path)
        out[name] = load_tokenizer(path)
    return out


def _hf_surfaces(tok, ids):
    return [tok.hf.convert_tokens_to_string([p]) for p in tok.hf.convert_ids_to_tokens([int(i) for i in ids])]


def _both_content_and_call():
    rec = json.loads(json.dumps(TOOL_CHAT))
    rec["messages"][2]["content"] = "Let me check."
    return rec


@pytest.mark.parametrize("rec", [TOOL_CHAT, OPENAI_TOOLS, _both_content_and_call(), SHAREGPT_TOOLS,
                                 {"messages": [{"role": "user", "content": "2+2?"},
                                               {"role": "assistant", "content": "<think>\n\n</think>\n\n4"}]}])
def test_hf_qwen_template_gives_the_classes_of_chatml(hf_tool_tokenizers, rec):
    """Rendering with a Qwen-style chat_template (through tools=, tool_calls, reasoning_content) finds the same
    ids and the same class per token as witscale's own chatml: reasoning with its markup, the calls (parallel
    ones, after text or alone after reasoning), tool results in a run of tool messages, schemas as system."""
    tok = hf_tool_tokenizers["qwen"]
    conv = normalize_record(rec, "messages" if "messages" in rec else "sharegpt")
    ours = Renderer("chatml", tok)(conv)
    theirs = Renderer("hf", tok)(conv)
    assert theirs.ids.tolist() == ours.ids.tolist()
    assert [C(int(c)).name for c in theirs.classes] == [C(int(c)).name for c in ours.classes]


def test_hf_llama31_template_tools_in_the_first_user_message(hf_tool_tokenizers):
    tok = hf_tool_tokenizers["llama31"]
    conv = normalize_record(TOOL_CHAT, "messages")
    conv = conv._replace(messages=[m._replace(reasoning=None) for m in conv.messages])   # Llama 3.1 has none
    doc = Renderer("hf", tok)(conv)
    text = "".join(_hf_surfaces(tok, doc.ids))
    schema = json.dumps(WEATHER_TOOL, indent=4)
    assert schema in text and '"{\\"temp\\": 21}"' in text          # the tool result printed with tojson
    spans = [("Be brief.", S), (schema, S), ("Weather in Paris?", P),
             ('{"name": "get_weather", "parameters": {"city": "Paris"}}', TC), ("<|eot_id|>", E),
             ('"{\\"temp\\": 21}"', TL), ("It is 21 degrees in Paris.", R), ("<|eot_id|>", E)]
    _check_classes(_hf_surfaces(tok, doc.ids), doc.classes, text, spans)


def test_hf_refuses_what_the_template_drops(hf_tool_tokenizers, tmp_path):
    llama = Renderer("hf", hf_tool_tokenizers["llama31"])
    with pytest.raises(RecordError, match="does not render the reasoning of message 3"):
        llama(normalize_record(TOOL_CHAT, "messages"))
    both = normalize_record(_both_content_and_call(), "messages")
    both = both._replace(messages=[m._replace(reasoning=None) for m in both.messages])
    with pytest.raises(RecordError, match="does not render the text of message 3 verbatim"):
        llama(both)                                       # Llama 3.1 drops the text beside a call
    parallel = normalize_record(OPENAI_TOOLS, "messages")
    with pytest.raises(RecordError, match="only supports single tool-calls"):
        llama(parallel._replace(messages=[m._replace(reasoning=None) for m in parallel.messages]))
    # a chat_template without tool support: the schemas would silently vanish
    tok = hf_tool_tokenizers["qwen"]
    tok.hf.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    try:
        rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
               "tools": [WEATHER_TOOL]}
        with pytest.raises(RecordError, match="does not render tool 'get_weather' as JSON"):
            Renderer("hf", tok)(normalize_record(rec, "messages"))
    finally:
        tok.hf.chat_template = QWEN_LIKE


def test_hf_special_token_ids_resolved_once(hf_tool_tokenizers, monkeypatch):
    """Packing with a fixed template through an HF tokenizer looks each special token up once, not per record:
    get_vocab() builds the whole vocabulary dict (151k entries for Qwen) and made chatml 10-50x slower than plain."""
    from witscale.data.tokenizer import load_tokenizer as load
    tok = load(hf_tool_tokenizers["qwen"].path)
    calls = []
    real = tok.hf.get_vocab
    monkeypatch.setattr(tok.hf, "get_vocab", lambda: calls.append(1) or real())
    renderer = Renderer("chatml", tok)
    docs = [renderer(normalize_record(TOOL_CHAT, "messages")) for _ in range(20)]
    assert all(np.array_equal(d.ids, docs[0].ids) for d in docs)
    assert len(calls) <= 2            # one per distinct special (<|im_start|>, <|im_end|>), then cached
