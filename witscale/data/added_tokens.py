"""``--add-special-tokens``: a base model's tokenizer extended with the special tokens its template needs.

LLaMA-2's tokenizer has no ``<|im_start|>``: packing it with ``chatml`` is refused (render.py) unless the
packer adds the missing tokens (transformers' ``add_tokens(special_tokens=True)``: new ids after the last one,
never split by the tokenizer). The extended tokenizer is saved into a scratch directory, the packer tokenizes
through it, and the dataset writer copies it into the packed directory as ``tokenizer/`` (written aside and
renamed with the rest, witscale/data/format.py). The manifest's ``tokenizer`` entry is the extended
tokenizer's fingerprint plus ``added_tokens``: the tokens and their ids, the base tokenizer's fingerprint and
the new vocabulary size.

Training reads that record (witscale/data/loader.py): the model's own tokenizer may be the base one, and a
model whose vocabulary is smaller than the data's grows its embedding and LM head (witscale/model/grow.py);
``--export-hf`` copies the data's extended tokenizer.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile

from witscale.data.errors import TokenizerError
from witscale.data.templates import TEMPLATES

ADDED_TOKENS_FILE = "witscale_added_tokens.json"   # the record, inside the extended tokenizer's directory
PACKED_TOKENIZER_DIR = "tokenizer"                 # where a packed dataset keeps its extended tokenizer


def missing_special_tokens(template: str, tokenizer) -> list[str]:
    """The special tokens ``template`` requires that ``tokenizer`` lacks (BOS/EOS are the tokenizer's own and
    never added; tulu's role tokens are rendered as text without them; ``hf`` uses the tokenizer's template)."""
    spec = TEMPLATES.get(template)
    if spec is None:
        return []
    return [name for name in spec.required if name not in ("bos", "eos") and tokenizer.token_id(name) is None]


def read_added_record(directory: str) -> dict | None:
    """The ``added_tokens`` record of an extended tokenizer directory, None for any other tokenizer."""
    path = os.path.join(directory, ADDED_TOKENS_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{ADDED_TOKENS_FILE} is unreadable: {e}", directory) from None


def extend_tokenizer(tokenizer_path: str, template: str, out_dir: str) -> dict | None:
    """Save ``tokenizer_path``'s tokenizer plus ``template``'s missing special tokens into ``out_dir`` (an
    existing, empty directory) with its record; returns the record, or None when nothing is missing."""
    from witscale.data.tokenizer import HFTokenizer, load_tokenizer

    base = load_tokenizer(tokenizer_path)
    missing = missing_special_tokens(template, base)
    if not missing:
        return None
    if not isinstance(base, HFTokenizer):
        raise TokenizerError(f"--add-special-tokens needs a Hugging Face tokenizer directory (tokenizer.json) to "
                             f"add {', '.join(missing)} to; this is a SentencePiece model", tokenizer_path)
    hf, base_fingerprint = base.hf, base.fingerprint()     # before hf is extended in place
    before = len(hf)
    from tokenizers import AddedToken
    # special: never split, never normalized, kept whole by decode(skip_special_tokens=False)
    hf.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    ids = [int(i) for i in hf.convert_tokens_to_ids(missing)]
    if len(hf) != before + len(missing) or sorted(ids) != list(range(before, len(hf))):
        raise TokenizerError(f"adding {', '.join(missing)} did not give them the ids {before}..{len(hf) - 1}",
                             tokenizer_path)
    hf.save_pretrained(out_dir)
    record = {"tokens": [{"token": t, "id": i} for t, i in zip(missing, ids)], "base": base_fingerprint,
              "vocab_size": len(hf), "template": template}
    with open(os.path.join(out_dir, ADDED_TOKENS_FILE), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, ensure_ascii=False)
    return record


def tokenizer_for_packing(tokenizer_path: str, template: str) -> str:
    """--add-special-tokens: the tokenizer path to pack with — a scratch copy extended with the template's
    missing special tokens (removed when the process exits), or ``tokenizer_path`` when nothing is missing."""
    scratch = tempfile.mkdtemp(prefix="witscale-tokenizer-")
    atexit.register(shutil.rmtree, scratch, True)
    record = extend_tokenizer(tokenizer_path, template, scratch)
    if record is None:
        print(f"--add-special-tokens: {tokenizer_path} already has every special token of --template {template}; "
              f"nothing added", file=sys.stderr)
        return tokenizer_path
    added = ", ".join(f"{t['token']}={t['id']}" for t in record["tokens"])
    print(f"--add-special-tokens: added {len(record['tokens'])} special tokens ({added}); vocabulary "
          f"{record['base']['vocab_size']} → {record['vocab_size']}; the extended tokenizer is saved in the packed "
          f"directory's {PACKED_TOKENIZER_DIR}/", file=sys.stderr)
    return scratch
