"""POSIX prompt variants: deterministic, and intent-preserving by construction — each variant differs from
the original exactly where its recorded edit says, and nowhere else."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, write_jsonl
from witscale.evaluation.variants import (QWERTY_NEIGHBOURS, SPELLING_COUNTS, TEMPLATE_FORMATS, PromptFileError,
                                          apply_spelling_edits, corruptible_positions, read_prompt_sets)

PROMPTS = [{"instruction": "Reverse the order of these words.", "input": "apple river stone"},
           {"instruction": "What is 12 plus 7?"},
           {"prompt": "Name the capital city of Zorvia, please."},
           "Sort these numbers in ascending order: 5, 3, 9"]


def write_prompts(path, records) -> str:
    return write_jsonl(path, [json.dumps(r) for r in records])


def diff_positions(original: str, variant: str, edits: list[dict]) -> None:
    """Walk both strings independently of apply_spelling_edits: outside the edited positions they agree."""
    by_pos = {e["pos"]: e for e in edits}
    i = j = 0
    while i < len(original):
        e = by_pos.get(i)
        if e is None:
            assert variant[j] == original[i], (original, variant, i)
            i, j = i + 1, j + 1
        elif e["op"] == "substitute":
            assert variant[j] == e["to"] != original[i]
            i, j = i + 1, j + 1
        elif e["op"] == "delete":
            i += 1
        else:
            assert variant[j:j + 2] == original[i] * 2
            i, j = i + 1, j + 2
    assert j == len(variant)


def test_generated_sets_are_deterministic_and_the_seed_matters(tmp_path):
    path = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    a = [s.to_json() for s in read_prompt_sets(path, seed=3)]
    b = [s.to_json() for s in read_prompt_sets(path, seed=3)]
    c = [s.to_json() for s in read_prompt_sets(path, seed=4)]
    assert a == b and a != c
    assert [s["kind"] for s in a] == ["spelling", "template"] * len(PROMPTS)
    # pinned: the generator must not drift between releases (users compare numbers across runs)
    assert a[2]["variants"][1] == "What is 12 ppus 7?"


def test_spelling_variants_differ_only_where_the_edits_say(tmp_path):
    path = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    sets = [s for s in read_prompt_sets(path, kinds=["spelling"], seed=0)]
    assert len(sets) == len(PROMPTS)
    for s, record in zip(sets, PROMPTS):
        instruction = record if isinstance(record, str) else record.get("instruction", record.get("prompt"))
        inp = record.get("input", "") if isinstance(record, dict) else ""
        original = instruction + ("\n\n" + inp if inp else "")
        assert s.variants[0] == original and s.edits[0]["errors"] == []
        assert len(s.variants) == 1 + len(SPELLING_COUNTS)
        allowed = set(corruptible_positions(instruction))
        for k, variant, edit in zip(SPELLING_COUNTS, s.variants[1:], s.edits[1:]):
            errors = edit["errors"]
            assert edit["field"] == "instruction"
            assert len(errors) == min(k, len(allowed))
            assert len({e["pos"] for e in errors}) == len(errors)
            for e in errors:
                assert e["pos"] in allowed and instruction[e["pos"]] == e["from"]
                assert e["from"].isalpha() and not e["from"].isdigit()
                if e["op"] == "substitute":
                    assert e["to"].lower() in QWERTY_NEIGHBOURS[e["from"].lower()]
                    assert e["to"].isupper() == e["from"].isupper()
            corrupted = apply_spelling_edits(instruction, errors)
            assert variant == corrupted + ("\n\n" + inp if inp else "")     # the input is never touched
            diff_positions(instruction, corrupted, errors)
            # digits, spaces and punctuation survive: the numbers and word boundaries carry the intent
            assert [c for c in corrupted if not c.isalpha()] == [c for c in instruction if not c.isalpha()]


def test_corruptible_positions_skip_first_letters_short_words_and_digits():
    text = "Add 12 to an apple."
    pos = corruptible_positions(text)
    assert [text[p] for p in pos] == list("dd") + list("pple")
    assert corruptible_positions("a 1 to 99") == []


def test_template_variants_keep_instruction_and_input_verbatim(tmp_path):
    path = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    sets = read_prompt_sets(path, kinds=["template"])
    with_input, without = sets[0], sets[1]
    assert len(with_input.variants) == len(without.variants) == 5
    assert with_input.variants[0] == "Reverse the order of these words.\n\napple river stone"
    assert without.variants[0] == "What is 12 plus 7?"
    names = {n for n, *_ in TEMPLATE_FORMATS}
    for s, record in ((with_input, PROMPTS[0]), (without, PROMPTS[1])):
        assert len(set(s.variants)) == len(s.variants)
        for variant, edit in zip(s.variants, s.edits):
            assert edit["format"] in names
            assert variant == edit["pattern"].format(instruction=record["instruction"], input=record.get("input", ""))
            assert record["instruction"] in variant and record.get("input", "") in variant


def test_variants_file_is_used_as_given_and_bad_files_are_refused(tmp_path):
    given = write_jsonl(tmp_path / "v.jsonl", [{"variants": ["a b", "A B"], "id": "x"}, {"variants": ["c", "d", "e"]}])
    sets = read_prompt_sets(given)
    assert [(s.id, s.kind, s.variants) for s in sets] == [("x", "given", ["a b", "A B"]), ("1", "given", ["c", "d", "e"])]
    for records, msg in (([{"variants": ["only one"]}], "at least 2"),
                         ([{"variants": ["a", "b"]}, {"prompt": "c"}], "mixes"),
                         (["{not json"], "not JSON"),
                         ([{"question": "?"}], "expected"),
                         ([], "no prompts")):
        with pytest.raises(PromptFileError, match=msg):
            read_prompt_sets(write_jsonl(tmp_path / "bad.jsonl", records))
    with pytest.raises(PromptFileError, match="unknown variant kind"):
        read_prompt_sets(given, kinds=["paraphrase"])


def test_make_variants_cli_writes_the_sets(tmp_path):
    path = write_prompts(tmp_path / "p.jsonl", PROMPTS[:2])
    out = tmp_path / "sets.jsonl"
    res = subprocess.run([sys.executable, "tools/evaluate.py", "--model", "unused", "--posix", path,
                          "--make-variants", str(out)], cwd=REPO_ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 4 and all(len(s["variants"]) == 5 for s in lines)
    # the written sets read back as given sets, unchanged
    again = read_prompt_sets(str(out))
    assert [s.variants for s in again] == [s["variants"] for s in lines]
