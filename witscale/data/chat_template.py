"""The ``hf`` template: the tokenizer's own chat_template (Jinja, rendered locally by transformers; no remote
code). Classes come from rendering message by message: each longer prefix of the conversation must extend
the previous rendering (prefix stability), and each message's text must appear verbatim in what its turn
added. Anything else fails with the record named, rather than guessing a mask."""
from __future__ import annotations

import numpy as np

from witscale.data.classes import TokenClass
from witscale.data.errors import RecordError, TokenizerError
from witscale.data.readers import Conversation
from witscale.data.templates import classify_tokens, content_class, end_class
from witscale.data.tokenizer import HFTokenizer

_END = len(TokenClass)   # provisional class: template text after an assistant turn (EOT if special, else TEMPLATE)


class HFChatRenderer:
    def __init__(self, tokenizer):
        if not isinstance(tokenizer, HFTokenizer) or not getattr(tokenizer.hf, "chat_template", None):
            raise TokenizerError("template 'hf' needs a Hugging Face tokenizer directory with a chat_template",
                                 tokenizer.path)
        self.tok = tokenizer
        self._special_ids = np.array(sorted(set(tokenizer.hf.all_special_ids) |
                                            set(tokenizer.hf.added_tokens_decoder)), dtype=np.int64)

    def _apply(self, msgs, generation_prompt: bool) -> str:
        try:
            return self.tok.hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:  # the template's own raise_exception, or a Jinja error
            raise RecordError(f"chat_template failed: {type(e).__name__}: {e}") from None

    def __call__(self, conv: Conversation):
        msgs = [{"role": m.role, "content": m.full_text()} for m in conv.messages]
        text, cls_parts, msg_parts = "", [], []

        def extend(new: str, k: int, step: str, content: str | None, ccls: int, after_cls: int):
            nonlocal text
            if not new.startswith(text):
                raise RecordError(f"chat_template is not prefix-stable at message {k + 1} ({step}): rendering "
                                  f"more messages changed earlier text, so the class boundaries are unknown")
            delta = new[len(text):]
            if content is None:
                pieces = [(delta, TokenClass.TEMPLATE)]
            else:
                pos = delta.find(content)
                if pos < 0:
                    raise RecordError(f"chat_template changes the text of message {k + 1}; cannot locate it")
                pieces = [(delta[:pos], TokenClass.TEMPLATE), (content, ccls), (delta[pos + len(content):], after_cls)]
            for piece, c in pieces:
                cls_parts.append(np.full(len(piece), c, dtype=np.uint8))
                msg_parts.append(np.full(len(piece), k, dtype=np.int64))
            text = new

        for k, m in enumerate(conv.messages):
            if m.role == "assistant":
                extend(self._apply(msgs[:k], True) if k else "", k, "generation prompt", None, 0, 0)
            after = _END if end_class(m) == TokenClass.EOT else TokenClass.TEMPLATE
            extend(self._apply(msgs[:k + 1], False), k, "turn", m.full_text(), content_class(m), after)
        ids, begin, end = self.tok.encode_with_offsets(text)
        char_cls = np.concatenate(cls_parts) if cls_parts else np.zeros(0, np.uint8)
        char_msg = np.concatenate(msg_parts) if msg_parts else np.zeros(0, np.int64)
        cls, msg = classify_tokens(text, char_cls, char_msg, begin, end, num_classes=_END + 1)
        is_special = np.isin(ids, self._special_ids)
        cls = np.where(cls == _END, np.where(is_special, TokenClass.EOT, TokenClass.TEMPLATE), cls)
        return ids.astype(np.int32), cls.astype(np.uint8), msg
