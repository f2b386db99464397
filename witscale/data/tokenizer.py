"""Tokenizers behind one small interface: text → (ids, character offsets), special ids, a fingerprint.

Two kinds:
  * a SentencePiece ``.model`` file (or a directory holding only ``tokenizer.model``);
  * a local Hugging Face tokenizer directory (fast tokenizers only: they report offsets). Loaded with
    ``local_files_only=True, trust_remote_code=False``: no download, no remote code.

``encode_with_offsets(text, continuation=...)``: a *continuation* run follows a special token inside a
document. SentencePiece (and HF's Metaspace tokenizers) prepend a word-boundary "▁" to a fresh string; after a
special token the modern behaviour (and the one of tokenizing the whole rendered string) is not to, so
continuation runs are encoded without that dummy prefix.

pad_id: the tokenizer's pad token; if it has none, its eos; failing that 0. Pad positions are never
predicted and never attended to across documents, so the id only needs to be a valid one.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os

import numpy as np

from witscale.data.errors import TokenizerError
from witscale.data.piece_offsets import PieceLengths, byte_to_char_offsets


def _char_offsets(text: str, byte_begin: np.ndarray, byte_end: np.ndarray):
    """UTF-8 byte offsets → character offsets (a byte-fallback token may cover part of a character)."""
    if text.isascii():
        return byte_begin, byte_end
    return byte_to_char_offsets(text, byte_begin, byte_end)


class Spans:
    """One string's tokens: ``ids`` (int32) and each token's character span — the (begin, end) that
    ``encode_with_offsets`` gives — read per token (``span``) rather than as arrays: the classes of a run change
    at a few character positions (templates.classify_segments), so only the tokens near those are looked at.
    ``monotone``: begins and ends never decrease along the tokens (what ``first_from`` needs)."""
    ids: np.ndarray
    monotone = True

    def __len__(self) -> int:
        return len(self.ids)

    def span(self, i: int) -> tuple[int, int]:
        raise NotImplementedError

    def first_from(self, pos: int) -> int:
        """The index of the first token whose span begins at or after character ``pos`` (the number of tokens
        that begin before it): a binary search over the begins."""
        lo, hi = 0, len(self.ids)
        if hi == 0 or self.span(hi - 1)[0] < pos:      # at or past the last token (a turn ending the text)
            return hi
        while lo < hi:
            mid = (lo + hi) // 2
            if self.span(mid)[0] < pos:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def firsts_from(self, positions: list) -> list:
        """``[first_from(p) for p in positions]``."""
        return [self.first_from(p) for p in positions]

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(begin int64[n], end int64[n])."""
        raise NotImplementedError


class ArraySpans(Spans):
    """Spans of ``encode_with_offsets``' arrays (SentencePiece; any tokenizer's reference path)."""

    def __init__(self, ids: np.ndarray, begin: np.ndarray, end: np.ndarray, monotone: bool | None = None):
        self.ids, self.begin, self.end = ids, begin, end
        self.monotone = bool(np.all(begin[1:] >= begin[:-1]) and np.all(end[1:] >= end[:-1])) \
            if monotone is None else monotone

    def span(self, i: int) -> tuple[int, int]:
        return int(self.begin[i]), int(self.end[i])

    def first_from(self, pos: int) -> int:
        return int(self.begin.searchsorted(pos, side="left"))

    def firsts_from(self, positions: list) -> list:
        return self.begin.searchsorted(positions, side="left").tolist()

    def arrays(self):
        return self.begin, self.end


class EncodingSpans(Spans):
    """Spans of a fast tokenizer's backend ``Encoding`` (its anchor stripped: HFTokenizer's continuation), read
    through ``Encoding.token_to_chars`` one token at a time: the list of every token's offset tuple, and its
    conversion to arrays, cost a third of the tokenizing. The tokenizers library emits offsets in order — each
    pre-tokenized split's tokens, the splits in text order, alignments kept in order by every normalizer —
    so begins and ends never decrease (``monotone``; tests/test_pack_batched.py checks it on adversarial text
    against the arrays)."""

    def __init__(self, encoding, shift: int, ids: np.ndarray):
        self.ids = ids
        self._enc, self._shift, self._first = encoding, shift, 1 if shift else 0

    def span(self, i: int) -> tuple[int, int]:
        b, e = self._enc.token_to_chars(i + self._first)
        if self._shift:      # as HFTokenizer._strip_anchor: shifted, clipped at 0
            return max(b - self._shift, 0), max(e - self._shift, 0)
        return b, e

    def first_from(self, pos: int) -> int:
        # the first token covering character pos (Encoding.char_to_token, a scan in Rust), moved to the first
        # token that begins at or after pos: a few span reads instead of a binary search's dozen
        if pos <= 0:
            return 0
        t = self._enc.char_to_token(pos + self._shift)
        if t is None or t < self._first:                 # pos is in no token (dropped whitespace)
            return super().first_from(pos)
        i, n = t - self._first, len(self.ids)
        while i > 0 and self.span(i - 1)[0] >= pos:
            i -= 1
        while i < n and self.span(i)[0] < pos:
            i += 1
        return i

    def arrays(self):
        offs = self._enc.offsets
        offs = np.fromiter(itertools.chain.from_iterable(offs), dtype=np.int64, count=2 * len(offs)).reshape(-1, 2)
        offs = offs[self._first:] - self._shift
        return np.maximum(offs[:, 0], 0), np.maximum(offs[:, 1], 0)


class Tokenizer:
    kind = "?"
    path: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int
    added: dict | None = None    # --add-special-tokens: the record of a tokenizer extended by the packer

    def encode_with_offsets(self, text: str, continuation: bool = False):
        """(ids int32[n], begin int64[n], end int64[n]); offsets are character positions in `text`."""
        raise NotImplementedError

    def encode_many(self, requests: list, lengths_only=frozenset()) -> list:
        """``[encode_with_offsets(text, continuation) for text, continuation in requests]`` — for the request
        indices in ``lengths_only``, only the number of tokens (an int). A fast tokenizer encodes them all in
        one batch call (SentencePiece: one call each)."""
        return [len(enc[0]) if i in lengths_only else enc
                for i, enc in enumerate(self.encode_with_offsets(t, c) for t, c in requests)]

    def encode_spans(self, requests: list, lengths_only=frozenset()) -> list:
        """``encode_many``, each encoding (not counted-only) as a :class:`Spans`."""
        return [enc if i in lengths_only else ArraySpans(*enc)
                for i, enc in enumerate(self.encode_many(requests, lengths_only))]

    prefix_stable = False     # see prefix_count

    def prefix_count(self, spans, c: int) -> int | None:
        """``len(encode(text[:c]))`` read off ``spans``, the encoding of the whole ``text`` (same continuation),
        or None where it cannot be: only a prefix-stable tokenizer (``prefix_stable``) tokenizes a prefix that
        ends where a token of the whole text begins into exactly the tokens before that one."""
        return None

    def encode(self, text: str, continuation: bool = False) -> list[int]:
        return self.encode_with_offsets(text, continuation)[0].tolist()

    def token_id(self, piece: str) -> int | None:
        """Id of a (special) token given as its string, or None if the vocabulary lacks it."""
        raise NotImplementedError

    def require_token(self, piece: str, needed_by: str) -> int:
        tid = self.token_id(piece)
        if tid is None:
            raise TokenizerError(f"tokenizer has no token {piece!r}, which {needed_by} needs; pick another "
                                 f"--template or a tokenizer that defines it", self.path)
        return tid

    def vocabulary(self) -> list[str]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        """Text of token ids, special tokens spelled out."""
        raise NotImplementedError

    def fingerprint(self) -> dict:
        fp = {"kind": self.kind, "vocab_size": int(self.vocab_size), "bos_id": self.bos_id,
              "eos_id": self.eos_id, "pad_id": int(self.pad_id), "digest": vocabulary_digest(self.vocabulary())}
        if self.added:
            fp["added_tokens"] = self.added      # the tokens, their ids, the base's fingerprint (added_tokens.py)
        return fp

    def extended_directory(self) -> str | None:
        """The directory of a tokenizer extended by --add-special-tokens (copied into the packed dataset)."""
        return self.path if self.added else None


def vocabulary_digest(pieces: list[str]) -> str:
    """The tokenizer digest of a packed manifest (``tokenizer.digest``): sha256 of every piece, special and
    added tokens included, in id order, as JSON. Of the content, not of files or paths: a tokenizer's
    SentencePiece model and its HF tokenizer.json give the same digest when they hold the same pieces at the
    same ids. It does not see merges or normalization rules (two tokenizers with one vocabulary agree)."""
    return hashlib.sha256(json.dumps(list(pieces), ensure_ascii=False).encode("utf-8")).hexdigest()


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, path: str):
        import sentencepiece as spm
        self.path = path
        self._sp = spm.SentencePieceProcessor()
        try:
            with open(path, "rb") as f:
                self._proto = f.read()
            self._sp.LoadFromSerializedProto(self._proto)
        except Exception as e:
            raise TokenizerError(f"cannot load SentencePiece model: {e}", path) from None
        self._sp_cont = None
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        pad = self._sp.pad_id()
        self.pad_id = pad if pad >= 0 else (self.eos_id if self.eos_id is not None else 0)

    def _continuation_processor(self):
        """A copy of the model with add_dummy_prefix off (needs protobuf, shipped with sentencepiece's pb2)."""
        if self._sp_cont is None:
            import sentencepiece as spm
            try:
                from sentencepiece import sentencepiece_model_pb2 as pb
            except ImportError as e:  # protobuf missing
                raise TokenizerError(f"encoding text after a special token needs the 'protobuf' package ({e})",
                                     self.path) from None
            proto = pb.ModelProto()
            proto.ParseFromString(self._proto)
            if proto.normalizer_spec.add_dummy_prefix:
                proto.normalizer_spec.add_dummy_prefix = False
                sp = spm.SentencePieceProcessor()
                sp.LoadFromSerializedProto(proto.SerializeToString())
                self._sp_cont = sp
            else:
                self._sp_cont = self._sp
        return self._sp_cont

    def encode_with_offsets(self, text: str, continuation: bool = False):
        sp = self._continuation_processor() if continuation else self._sp
        pieces = sp.encode(text, return_type="proto").pieces  # pieces carry begin/end
        n = len(pieces)
        ids = np.fromiter((p.id for p in pieces), dtype=np.int32, count=n)
        begin = np.fromiter((p.begin for p in pieces), dtype=np.int64, count=n)
        end = np.fromiter((p.end for p in pieces), dtype=np.int64, count=n)
        begin, end = _char_offsets(text, begin, end)
        return ids, begin, end

    def token_id(self, piece: str) -> int | None:
        tid = self._sp.piece_to_id(piece)
        if tid == self._sp.unk_id() and piece != self._sp.id_to_piece(tid):
            return None
        return int(tid)

    def vocabulary(self) -> list[str]:
        return [self._sp.id_to_piece(i) for i in range(self.vocab_size)]

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])


class HFTokenizer(Tokenizer):
    kind = "hf"

    def __init__(self, path: str):
        from transformers import AutoTokenizer
        self.path = path
        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        except Exception as e:
            raise TokenizerError(f"cannot load Hugging Face tokenizer: {type(e).__name__}: {e}", path) from None
        if not getattr(tok, "is_fast", False):
            raise TokenizerError("a fast (Rust) tokenizer is needed for character offsets; this one is slow", path)
        self.hf = tok
        self.vocab_size = len(tok)
        self.bos_id = tok.bos_token_id
        self.eos_id = tok.eos_token_id
        pad = tok.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        # any added special token works as an anchor that ends the "fresh string" state
        specials = [t for t in tok.all_special_tokens if tok.convert_tokens_to_ids(t) is not None]
        self._anchor = specials[0] if specials else None
        self._anchor_id = tok.convert_tokens_to_ids(self._anchor) if self._anchor is not None else None
        # special-token ids, resolved once per piece: get_vocab() builds the whole vocabulary dict (151k
        # entries for Qwen) and templates look their specials up for every record
        self._token_ids: dict[str, int | None] = {}
        self._pieces = False                     # _piece_lengths(): not built yet
        from witscale.data.added_tokens import read_added_record
        self.added = read_added_record(path)

    def encode_with_offsets(self, text: str, continuation: bool = False):
        shift = len(self._anchor) if continuation and self._anchor is not None else 0
        enc = self.hf(self._anchor + text if shift else text, add_special_tokens=False, return_offsets_mapping=True)
        return self._strip_anchor(enc["input_ids"], enc["offset_mapping"], shift)

    def encode_many(self, requests: list, lengths_only=frozenset()) -> list:
        # one call of the transformers tokenizer on the list: the pipeline of a single string (which it encodes
        # as a batch of one, through the backend's encode_batch), in Rust, for every string at once
        if not requests:
            return []
        if self._backend_is_plain() and self._piece_lengths() is not None:     # offsets from the pieces
            return [s if isinstance(s, int) else (s.ids, *s.arrays())
                    for s in self.encode_spans(requests, lengths_only)]
        shifts, encodings = self._backend_encodings(requests, lengths_only)
        if encodings is not None:
            return [self._length(e, shift) if i in lengths_only else self._strip_anchor(e.ids, e.offsets, shift)
                    for i, (e, shift) in enumerate(zip(encodings, shifts))]
        texts = [self._anchor + t if shift else t for (t, _), shift in zip(requests, shifts)]
        enc = self.hf(texts, add_special_tokens=False, return_offsets_mapping=True)
        return [self._length(ids, shift) if i in lengths_only else self._strip_anchor(ids, offs, shift)
                for i, (ids, offs, shift) in enumerate(zip(enc["input_ids"], enc["offset_mapping"], shifts))]

    def encode_spans(self, requests: list, lengths_only=frozenset()) -> list:
        # offsets are read only where a caller asks: from the pieces' lengths where the tokenizer's pieces spell
        # the text (piece_offsets.py: encode_batch_fast, which tracks no offsets), else from the backend's
        # Encoding (EncodingSpans)
        if not requests:
            return []
        if not self._backend_is_plain():
            return super().encode_spans(requests, lengths_only)
        shifts, texts = self._anchored(requests)
        backend = self.hf.backend_tokenizer
        pieces = self._piece_lengths()
        fast = getattr(backend, "encode_batch_fast", None)
        if pieces is None or fast is None:
            _, encodings = self._backend_encodings(requests, lengths_only)
            return [self._length(e, shift) if i in lengths_only else self._encoding_spans(e, shift)
                    for i, (e, shift) in enumerate(zip(encodings, shifts))]
        out, redo = [], []
        for i, (e, shift, text) in enumerate(zip(fast(texts, add_special_tokens=False), shifts, texts)):
            if i in lengths_only:
                out.append(self._length(e, shift))
                continue
            ids = self._ids(e, shift)
            spans = pieces.spans(text, ids)
            if spans is None:                    # the library's offsets for this one (a rare string)
                out.append(None)
                redo.append(i)
                continue
            begin, end = spans
            if shift:                            # as _strip_anchor
                ids, begin, end = ids[1:], np.maximum(begin[1:] - shift, 0), np.maximum(end[1:] - shift, 0)
            out.append(ArraySpans(ids, begin, end, monotone=True))
        if redo:
            for i, e in zip(redo, backend.encode_batch([texts[i] for i in redo], add_special_tokens=False)):
                out[i] = self._encoding_spans(e, shifts[i])
        return out

    @property
    def prefix_stable(self) -> bool:
        pieces = self._piece_lengths()
        return pieces is not None and pieces.prefix_stable and self._backend_is_plain()

    def prefix_count(self, spans, c: int) -> int | None:
        # a BPE over one word (Metaspace): merges never undone, applied in (rank, position) order — a word
        # whose tokens break at c merged its part before c exactly as that part alone (piece_offsets.py)
        if c <= 0 or not isinstance(spans, Spans) or not spans.monotone or not self.prefix_stable:
            return None
        k = spans.first_from(c)
        if k >= len(spans) or spans.span(k)[0] != c or (k and spans.span(k - 1)[1] > c):
            return None
        return k

    def _ids(self, e, shift: int) -> np.ndarray:
        """A backend Encoding's ids (int32, the anchor still in front of a continuation, checked)."""
        ids = e.ids
        if shift:
            self._check_anchor(ids)
        return np.fromiter(ids, dtype=np.int32, count=len(ids))

    def _encoding_spans(self, e, shift: int) -> "EncodingSpans":
        ids = self._ids(e, shift)
        return EncodingSpans(e, shift, ids[1:] if shift else ids)

    def _piece_lengths(self):
        """The piece-length table of this tokenizer (piece_offsets.PieceLengths), None where its pieces do not
        spell the text; built once."""
        if self._pieces is False:
            self._pieces = PieceLengths.of(self.hf.backend_tokenizer)
        return self._pieces

    def _anchored(self, requests: list):
        """(the anchor shift of each request, its text with the anchor in front where it is a continuation)."""
        shifts = [len(self._anchor) if c and self._anchor is not None else 0 for _, c in requests]
        return shifts, [self._anchor + t if shift else t for (t, _), shift in zip(requests, shifts)]

    def _backend_is_plain(self) -> bool:
        """Whether the backend's own calls give what transformers' call gives: no truncation or padding set on
        it, special tokens split (or not) as transformers would — else only transformers' call is right."""
        backend = self.hf.backend_tokenizer
        split_specials = bool(getattr(self.hf, "split_special_tokens", False))
        return backend.truncation is None and backend.padding is None \
            and getattr(backend, "encode_special_tokens", None) == split_specials

    def _backend_encodings(self, requests: list, lengths_only):
        """(the anchor shift of each request, the backend's Encoding of each — or None where the transformers
        tokenizer's state (truncation, padding, special-token splitting) differs from the backend's: then
        only its own call is right)."""
        shifts, texts = self._anchored(requests)
        if not self._backend_is_plain():
            return shifts, None
        backend = self.hf.backend_tokenizer
        # the state transformers' call would set: its backend call, without building Python lists of dicts
        # per string (as much time as the tokenizing). The strings of which only the token count is needed go
        # through encode_batch_fast where there is one: the same pipeline without tracking offsets (a third of
        # encode_batch's time)
        fast = getattr(backend, "encode_batch_fast", None) if lengths_only else None
        counted = [i for i in range(len(texts)) if i in lengths_only] if fast is not None else []
        encodings = backend.encode_batch([t for i, t in enumerate(texts) if i not in lengths_only] if counted
                                         else texts, add_special_tokens=False)
        if counted:
            merged = dict(zip(counted, fast([texts[i] for i in counted], add_special_tokens=False)))
            rest = iter(encodings)
            encodings = [merged[i] if i in merged else next(rest) for i in range(len(texts))]
        return shifts, encodings

    def _check_anchor(self, ids) -> None:
        if len(ids) == 0 or ids[0] != self._anchor_id:
            raise TokenizerError(f"special token {self._anchor!r} is not kept whole by the tokenizer", self.path)

    def _length(self, encoding, shift: int) -> int:
        """The token count of an encoding (a list of ids, or a backend Encoding: its len, no list built)."""
        if shift:
            self._check_anchor(encoding if isinstance(encoding, list) else encoding.ids)
        return len(encoding) - (1 if shift else 0)

    def _strip_anchor(self, ids: list, offs: list, shift: int):
        # np.fromiter: a third faster than np.array on the lists of ints and of (begin, end) tuples
        ids = np.fromiter(ids, dtype=np.int32, count=len(ids))
        offs = np.fromiter(itertools.chain.from_iterable(offs), dtype=np.int64, count=2 * len(offs)).reshape(-1, 2)
        if shift:
            self._check_anchor(ids)
            ids, offs = ids[1:], offs[1:] - shift
        return ids, np.maximum(offs[:, 0], 0), np.maximum(offs[:, 1], 0)

    def token_id(self, piece: str) -> int | None:
        if piece not in self._token_ids:
            tid = self.hf.get_vocab().get(piece)
            self._token_ids[piece] = int(tid) if tid is not None else None
        return self._token_ids[piece]

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def vocabulary(self) -> list[str]:
        items = sorted(self.hf.get_vocab().items(), key=lambda kv: kv[1])
        return [k for k, _ in items]


def load_tokenizer(path: str) -> Tokenizer:
    """A SentencePiece .model file, a directory holding only tokenizer.model, or a local HF tokenizer dir."""
    if not os.path.exists(path):
        raise TokenizerError("no such file or directory", path)
    if os.path.isfile(path):
        return SentencePieceTokenizer(path)
    names = set(os.listdir(path))
    hf_files = {"tokenizer.json", "tokenizer_config.json"}
    if "tokenizer.model" in names and not names & hf_files:
        return SentencePieceTokenizer(os.path.join(path, "tokenizer.model"))
    if not names & hf_files:
        raise TokenizerError("not a tokenizer: expected a SentencePiece .model file or a directory with "
                             "tokenizer.json / tokenizer_config.json", path)
    return HFTokenizer(path)


def model_tokenizer(source: str, prefer_kind: str | None = None) -> Tokenizer | None:
    """The tokenizer of a model directory (or a SentencePiece .model file), None when it has no tokenizer files.
    A directory may hold a SentencePiece ``tokenizer.model``, an HF ``tokenizer.json`` (or ``vocab.json``), or
    both: ``prefer_kind`` ('sentencepiece' / 'hf', the data's) picks which one is read when both are there."""
    found = tokenizer_kinds(source)
    if os.path.isfile(source):
        return SentencePieceTokenizer(source) if found else None
    if not found:
        return None
    kind = prefer_kind if prefer_kind in found else found[0]
    return SentencePieceTokenizer(os.path.join(source, "tokenizer.model")) if kind == "sentencepiece" \
        else HFTokenizer(source)


def tokenizer_kinds(source: str) -> list[str]:
    """The tokenizer kinds whose files a model directory holds ([] for none). A single file (``--tokenizer``)
    is a SentencePiece model, unless it is a .json file (not readable alone: not compared)."""
    if os.path.isfile(source):
        return [] if source.endswith(".json") else ["sentencepiece"]
    kinds = []
    if os.path.isfile(os.path.join(source, "tokenizer.model")):
        kinds.append("sentencepiece")
    if any(os.path.isfile(os.path.join(source, n)) for n in ("tokenizer.json", "vocab.json")):
        kinds.append("hf")
    return kinds
