"""Token offsets from the pieces' lengths, for the BPE tokenizers whose pieces spell the text: a fast tokenizer's
``encode_batch`` tracks every character's alignment and builds every token's string to report offsets — half
again the time of ``encode_batch_fast``, which reports none. For the two BPE families most models use, each
token's piece *is* a stretch of the text's UTF-8 bytes:

* **Metaspace** (LLaMA-2, Mistral, Yi, TinyLlama…): a piece's text with "▁" for a space, or one ``<0xXX>``
  byte-fallback byte; a fresh string gets a dummy "▁" in front (the pre-tokenizer's ``prepend_scheme``
  ``first``, or the legacy ``Prepend`` normalizer), which the library aligns with the first character;
* **ByteLevel** (GPT-2, Llama 3, Qwen): one byte per character of the piece (the byte-to-unicode alphabet);
  Qwen's NFC normalizer changes nothing in text that is already NFC;

and an added token (ChatML's, the anchor of a continuation) spells its content. So a token's byte span is the
running sum of its pieces' byte lengths, and its character span the characters those bytes fall in — a byte
of a character split into fallback bytes gets that character, as the library gives it.

The sum is checked against the text, one integer comparison per string: a string whose pieces do not add up
to its bytes (once the dummy "▁"s the tokenizer puts in are taken off) — an unknown token, a literal "▁" in the text, a non-NFC
string, an added token that strips whitespace — is answered ``None`` and takes the library's offsets. A
tokenizer that is none of these (another model type, normalizer or pre-tokenizer) has no table at all.
tests/test_pack_batched.py checks the spans equal the library's on adversarial text for both families."""
from __future__ import annotations

import json
import re
import unicodedata

import numpy as np

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# a token whose span the table cannot give (the unknown token, an added token that strips whitespace): its
# "length" sends any string holding it below zero — never equal to a string's length
_REFUSE = -(1 << 40)


class PieceLengths:
    """``spans(text, ids)``: each token's (begin, end) character offsets in ``text`` from a table of the UTF-8
    bytes each token id spells, or None where the table cannot vouch for them (see the module docstring)."""

    def __init__(self, nbytes: np.ndarray, dummy_first: np.ndarray, added: np.ndarray, dummy: str | None,
                 nfc: bool, prefix_stable: bool = False):
        self.nbytes = nbytes                 # int64 [vocab]: bytes of text each id spells
        self.dummy_first = dummy_first       # bool [vocab]: (Metaspace) the piece starts with "▁"
        self.added = added                   # bool [vocab]: an added token (a section of its own)
        # Metaspace's dummy "▁" (_metaspace): 'pre' on a string's first token, 'legacy' on every stretch's,
        # 'never'; None: ByteLevel
        self.dummy = dummy
        self.nfc = nfc
        # a Metaspace BPE tokenizes each stretch between added tokens as one word (split=False; with split=True
        # a word per "▁"), by merges applied in (rank, position) order and never undone. If the tokens of a
        # string break at character c, no merge crossed c, so the merges before c were those of text[:c]
        # alone, in the same order: len(tokenize(text[:c])) is the number of tokens before c
        # (Tokenizer.prefix_count; plain's paper boundary). Not for ByteLevel: its regex pre-tokenizer splits
        # a prefix's end differently (digits, trailing spaces); not with ignore_merges (a whole word found in
        # the vocabulary skips the merges), dropout, subword prefixes/suffixes or fused unknowns.
        self.prefix_stable = prefix_stable

    @classmethod
    def of(cls, backend) -> "PieceLengths | None":
        """The table of a ``tokenizers.Tokenizer`` of one of the two families, None for any other."""
        spec = json.loads(backend.to_str())
        model, norm, pre = spec.get("model") or {}, spec.get("normalizer"), spec.get("pre_tokenizer")
        if model.get("type") != "BPE":
            return None
        metaspace = _metaspace(norm, pre)
        bytelevel = metaspace is None and _bytelevel(pre) and (norm is None or norm.get("type") == "NFC")
        if metaspace is None and not bytelevel:
            return None
        vocab = backend.get_vocab(with_added_tokens=False)
        size = backend.get_vocab_size(with_added_tokens=True)
        nbytes = np.full(size, _REFUSE, dtype=np.int64)
        dummy = np.zeros(size, dtype=bool)
        added_ids = np.zeros(size, dtype=bool)
        for piece, i in vocab.items():
            if metaspace is not None:
                if model.get("byte_fallback") and _BYTE_PIECE.fullmatch(piece):
                    nbytes[i] = 1
                else:
                    nbytes[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
                    dummy[i] = piece.startswith("\u2581")
            else:
                nbytes[i] = len(piece)
        for added in spec.get("added_tokens") or []:
            content, i = added["content"], added["id"]
            plain = not (added.get("lstrip") or added.get("rstrip")) and not (
                added.get("normalized") and (" " in content or "\u2581" in content))
            nbytes[i] = len(content.encode("utf-8")) if plain else _REFUSE
            dummy[i], added_ids[i] = False, True
        unk = model.get("unk_token")
        if unk is not None and unk in vocab:
            nbytes[vocab[unk]] = _REFUSE
        stable = metaspace is not None and not model.get("ignore_merges") and model.get("dropout") is None \
            and not model.get("continuing_subword_prefix") and not model.get("end_of_word_suffix") \
            and (bool(model.get("byte_fallback")) or not model.get("fuse_unk"))
        return cls(nbytes, dummy, added_ids, metaspace, nfc=bytelevel and norm is not None, prefix_stable=stable)

    def spans(self, text: str, ids: np.ndarray):
        """(begin int64[n], end int64[n]) of ``ids``, the tokens of ``text`` — or None (take the library's)."""
        if len(ids) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        nb = self.nbytes[ids]                # a new array (fancy indexing): adjusted in place below
        first = dummies = None               # the dummy "▁": on the first token ('pre'), or per section
        if self.dummy is not None:
            if "\u2581" in text:
                return None                 # a literal "▁" spells 3 bytes, a piece's "▁" counts one
            if self.dummy == "pre":
                first = text[:1] != " " and not self.added[ids[0]]
                if first:
                    if not self.dummy_first[ids[0]]:
                        return None
                    nb[0] -= 1
            elif self.dummy == "legacy":
                dummies = self._section_starts(ids)
                if not self.dummy_first[ids[dummies]].all():
                    return None
                nb[dummies] -= 1
        ascii_ = text.isascii()
        end = nb.cumsum()
        if int(end[-1]) != (len(text) if ascii_ else len(text.encode("utf-8"))):
            return None
        if self.nfc and not ascii_ and not unicodedata.is_normalized("NFC", text):
            return None
        begin = end - nb
        if not ascii_:
            begin, end = byte_to_char_offsets(text, begin, end)
        # the library aligns a dummy "▁" with the character after it
        if first and end[0] < 1:
            end[0] = 1
        elif dummies is not None:
            end[dummies] = np.maximum(end[dummies], begin[dummies] + 1)
        return begin, end

    def _section_starts(self, ids: np.ndarray) -> np.ndarray:
        """The first token of every stretch between added tokens: where the legacy Prepend normalizer puts a
        dummy "▁", whatever the stretch starts with (prepend_scheme 'first' puts one only on a string's first
        token, unless the string starts with a space or an added token)."""
        added = self.added[ids]
        return np.flatnonzero(~added & np.concatenate([[True], added[:-1]]))


def byte_to_char_offsets(text: str, byte_begin: np.ndarray, byte_end: np.ndarray):
    """UTF-8 byte spans → character spans: a span begins in the character holding its first byte and ends
    after the one holding its last (a byte-fallback token covering part of a character gets that character)."""
    cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    lens = 1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)
    starts = np.cumsum(lens) - lens
    begin = np.searchsorted(starts, byte_begin, side="right") - 1
    end = np.searchsorted(starts, byte_end, side="left")
    return np.maximum(begin, 0), end


def _metaspace(norm, pre):
    """How a Metaspace BPE tokenizer places its dummy "▁": 'pre' (the pre-tokenizer's prepend_scheme 'first'),
    'never', 'legacy' (LLaMA's older Prepend + Replace normalizer, no pre-tokenizer); None: not one of those
    (prepend_scheme 'always' puts one after every added token, conditionally: not modelled)."""
    if pre is not None and pre.get("type") == "Metaspace" and norm is None and pre.get("replacement") == "\u2581":
        scheme = pre.get("prepend_scheme", "always" if pre.get("add_prefix_space", True) else "never")
        return {"first": "pre", "never": "never"}.get(scheme)
    if pre is None and norm is not None and norm.get("type") == "Sequence":
        steps = [(n.get("type"), n.get("prepend"), (n.get("pattern") or {}).get("String"), n.get("content"))
                 for n in norm.get("normalizers", [])]
        if steps in ([("Prepend", "\u2581", None, None), ("Replace", None, " ", "\u2581")],
                     [("Replace", None, " ", "\u2581")]):
            return "legacy" if steps[0][0] == "Prepend" else "never"
    return None


def _bytelevel(pre) -> bool:
    """A ByteLevel pre-tokenizer without a prefix space, alone or after splits (which move no character)."""
    if pre is None:
        return False
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    if not steps or steps[-1].get("type") != "ByteLevel" or steps[-1].get("add_prefix_space"):
        return False
    return all(s.get("type") in ("Split", "Digits") for s in steps[:-1])
