"""Prompt sets for POSIX: N intent-preserving variants of one prompt.

Two sources, read by ``read_prompt_sets``:

* a **variants file**: one JSON object per line, ``{"variants": [x_1, …, x_N], "id": …, "kind": …}`` (``id``
  and ``kind`` optional) — the sets are used as given;
* a **prompts file**: one prompt per line, ``{"prompt": …}``, Alpaca's ``{"instruction": …, "input": …}`` or a
  bare JSON string — variants are generated here, offline and deterministically (same file, kinds and seed →
  same sets, on every machine):

  - ``spelling``: the prompt with 0 (the original), 1, 2, 4 and 8 corrupted characters. A corrupted character
    is a letter inside a word of three or more letters, never a word's first letter, never a digit, a
    space or punctuation — numbers and word boundaries, which carry the intent, are left alone; the
    operation is a substitution by a QWERTY neighbour (same case), a deletion or a doubling. Only the
    instruction is corrupted: an Alpaca ``input`` is the task's data and stays verbatim.
  - ``template``: the instruction and input, verbatim, in five prompt formats (separators, field labels and
    their casing): see ``TEMPLATE_FORMATS``.

  Every generated variant carries its ``edit``: for a spelling variant the list of corrupted positions (in the
  instruction) with operation, old and new character; for a template variant the format's name and pattern.
  ``apply_spelling_edits(original, edits)`` rebuilds the variant — the variants differ from the original
  exactly where the edit says and nowhere else (tested).

The prompt text of a record is the text the packer gives the ``user`` turn: ``instruction`` followed by a
blank line and the ``input`` when there is one (witscale/data/readers.py ``Message.full_text``).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Iterable, Optional

SPELLING_COUNTS = (1, 2, 4, 8)
KINDS = ("spelling", "template")

# (name, pattern with an input, pattern without one). The first is the packer's own rendering of the record.
TEMPLATE_FORMATS = (
    ("original", "{instruction}\n\n{input}", "{instruction}"),
    ("labels", "Instruction: {instruction}\nInput: {input}", "Instruction: {instruction}"),
    ("labels_upper", "INSTRUCTION: {instruction}\nINPUT: {input}", "INSTRUCTION: {instruction}"),
    ("markdown", "### Instruction:\n{instruction}\n\n### Input:\n{input}", "### Instruction:\n{instruction}"),
    ("separator", "{instruction}\n{input}", None),                      # with an input only: one newline
    ("labels_lower", None, "instruction: {instruction}"),             # without an input only
)

_QWERTY_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")


def _neighbours() -> dict[str, str]:
    pos = {c: (r, i) for r, row in enumerate(_QWERTY_ROWS) for i, c in enumerate(row)}
    out = {}
    for c, (r, i) in pos.items():
        near = []
        for dr, di in ((0, -1), (0, 1), (-1, 0), (-1, 1), (1, -1), (1, 0)):
            rr, ii = r + dr, i + di
            if 0 <= rr < len(_QWERTY_ROWS) and 0 <= ii < len(_QWERTY_ROWS[rr]):
                near.append(_QWERTY_ROWS[rr][ii])
        out[c] = "".join(near)
    return out


QWERTY_NEIGHBOURS = _neighbours()


@dataclass
class PromptSet:
    """One set of intent-preserving variants; ``edits[k]`` says how variant k was made (None: given)."""
    id: str
    kind: str
    variants: list[str]
    edits: list[Optional[dict]] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"id": self.id, "kind": self.kind, "variants": self.variants, "edits": self.edits}


class PromptFileError(ValueError):
    """A prompts or variants file that cannot be used; the message names the file and line."""


# ---------------------------------------------------------------------------------------------- spelling
def corruptible_positions(text: str) -> list[int]:
    """Letters inside words of ≥ 3 letters, except each word's first letter."""
    out, i, n = [], 0, len(text)
    while i < n:
        if text[i].isascii() and text[i].isalpha():
            j = i
            while j < n and text[j].isascii() and text[j].isalpha():
                j += 1
            if j - i >= 3:
                out.extend(range(i + 1, j))
            i = j
        else:
            i += 1
    return out


def apply_spelling_edits(text: str, edits: list[dict]) -> str:
    """The text with each edit applied at its position in the ORIGINAL text (positions are distinct)."""
    for e in sorted(edits, key=lambda e: e["pos"], reverse=True):
        p = e["pos"]
        if text[p] != e["from"]:
            raise ValueError(f"edit {e} does not match the text ({text[p]!r} at {p})")
        if e["op"] == "substitute":
            text = text[:p] + e["to"] + text[p + 1:]
        elif e["op"] == "delete":
            text = text[:p] + text[p + 1:]
        elif e["op"] == "double":
            text = text[:p + 1] + text[p] + text[p + 1:]
        else:
            raise ValueError(f"unknown edit operation {e['op']!r}")
    return text


def corrupt(text: str, count: int, rng: random.Random) -> tuple[str, list[dict]]:
    """``count`` corrupted characters (fewer when the text has fewer corruptible letters)."""
    positions = corruptible_positions(text)
    chosen = sorted(rng.sample(positions, min(count, len(positions))))
    edits = []
    for p in chosen:
        c = text[p]
        op = rng.choice(("substitute", "substitute", "delete", "double"))
        if op == "substitute":
            new = rng.choice(QWERTY_NEIGHBOURS[c.lower()])
            new = new.upper() if c.isupper() else new
            edits.append({"pos": p, "op": op, "from": c, "to": new})
        elif op == "delete":
            edits.append({"pos": p, "op": op, "from": c, "to": ""})
        else:
            edits.append({"pos": p, "op": op, "from": c, "to": c + c})
    return apply_spelling_edits(text, edits), edits


def _join(instruction: str, inp: str) -> str:
    return instruction + "\n\n" + inp if inp else instruction


def spelling_set(set_id: str, instruction: str, inp: str, seed: int,
                 counts: Iterable[int] = SPELLING_COUNTS) -> PromptSet:
    variants, edits = [_join(instruction, inp)], [{"field": "instruction", "errors": []}]
    for k in counts:
        rng = random.Random(f"witscale-posix/{seed}/{set_id}/spelling/{k}")   # str seeds: stable everywhere
        text, errs = corrupt(instruction, k, rng)
        variants.append(_join(text, inp))
        edits.append({"field": "instruction", "errors": errs})
    return PromptSet(set_id, "spelling", variants, edits)


def template_set(set_id: str, instruction: str, inp: str) -> PromptSet:
    variants, edits = [], []
    for name, with_input, without in TEMPLATE_FORMATS:
        pattern = with_input if inp else without
        if pattern is None:
            continue
        variants.append(pattern.format(instruction=instruction, input=inp))
        edits.append({"format": name, "pattern": pattern})
    return PromptSet(set_id, "template", variants, edits)


# ---------------------------------------------------------------------------------------------- files
def _base_prompt(obj, where: str) -> tuple[str, str]:
    if isinstance(obj, str):
        return obj, ""
    if isinstance(obj, dict):
        if isinstance(obj.get("prompt"), str):
            return obj["prompt"], ""
        if isinstance(obj.get("instruction"), str):
            inp = obj.get("input") or ""
            if not isinstance(inp, str):
                raise PromptFileError(f"{where}: 'input' must be a string")
            return obj["instruction"], inp
    raise PromptFileError(f"{where}: expected {{\"variants\": [...]}}, {{\"prompt\": ...}}, "
                          "{\"instruction\": ..., \"input\": ...} or a JSON string")


def read_prompt_sets(path: str, kinds: Iterable[str] = KINDS, seed: int = 0) -> list[PromptSet]:
    """The prompt sets of a variants file, or those generated from a prompts file (see the module doc).
    A file may not mix the two. Sets with fewer than two variants are an error (ψ needs pairs)."""
    kinds = list(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise PromptFileError(f"unknown variant kind {unknown[0]!r} (known: {', '.join(KINDS)})")
    try:
        f = open(path, encoding="utf-8-sig")
    except OSError as e:
        raise PromptFileError(f"{path}: {e.strerror}") from None
    given, bases = [], []
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:line {n}"
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise PromptFileError(f"{where}: not JSON ({e})") from None
            if isinstance(obj, dict) and "variants" in obj:
                v = obj["variants"]
                if not isinstance(v, list) or not all(isinstance(x, str) and x.strip() for x in v):
                    raise PromptFileError(f"{where}: 'variants' must be a list of non-empty strings")
                if len(v) < 2:
                    raise PromptFileError(f"{where}: a prompt set needs at least 2 variants, this one has {len(v)}")
                given.append(PromptSet(str(obj.get("id", len(given))), str(obj.get("kind", "given")), list(v),
                                       [None] * len(v)))
            else:
                instruction, inp = _base_prompt(obj, where)
                if not instruction.strip():
                    raise PromptFileError(f"{where}: empty prompt")
                bases.append((instruction, inp))
    if given and bases:
        raise PromptFileError(f"{path}: mixes prompt sets ({{\"variants\": …}}) and single prompts")
    if given:
        return given
    if not bases:
        raise PromptFileError(f"{path}: no prompts")
    if not kinds:
        raise PromptFileError(f"{path} holds single prompts: name the variant kinds to generate")
    sets = []
    for i, (instruction, inp) in enumerate(bases):
        for kind in kinds:
            s = (spelling_set(f"spelling-{i}", instruction, inp, seed) if kind == "spelling"
                 else template_set(f"template-{i}", instruction, inp))
            if len(set(s.variants)) >= 2:      # e.g. a one-word prompt has nothing to misspell
                sets.append(s)
    if not sets:
        raise PromptFileError(f"{path}: no prompt yields two distinct variants")
    return sets


def write_prompt_sets(sets: list[PromptSet], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for s in sets:
            f.write(json.dumps(s.to_json(), ensure_ascii=False) + "\n")
