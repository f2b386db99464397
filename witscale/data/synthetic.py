"""Synthetic, learnable instruction data and a tiny SentencePiece tokenizer, for the demo and the tests."""
from __future__ import annotations

import os
import random

CHAT_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                 "<|eot_id|>", "<|user|>", "<|assistant|>", "<|system|>"]

_WORDS = ("apple river stone cloud tiger lamp green quiet paper storm violet candle maple orbit "
          "silver honey north window garden pepper").split()
# a fixed table of made-up countries: learnable only from the data
_CAPITALS = {"Zorvia": "Kelmar", "Tandor": "Ospin", "Quellia": "Varrow", "Mirth": "Dunhollow", "Pellune": "Arcis",
             "Oskaria": "Brenn", "Valdoro": "Sefi", "Ithmar": "Caldus", "Noverra": "Plint", "Ulstad": "Gorran"}


def _reverse(rng):
    words = rng.sample(_WORDS, rng.randint(3, 6))
    wording = rng.choice(["Reverse the order of these words.", "Write the words in reverse order.",
                          "List the following words backwards."])
    return wording, " ".join(words), " ".join(reversed(words))


def _sort(rng):
    nums = [rng.randint(0, 99) for _ in range(rng.randint(3, 7))]
    wording = rng.choice(["Sort these numbers in ascending order.", "Put the numbers in increasing order.",
                          "Arrange from smallest to largest."])
    return wording, ", ".join(map(str, nums)), ", ".join(map(str, sorted(nums)))


def _add(rng):
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    wording = rng.choice([f"What is {a} plus {b}?", f"Add {a} and {b}.", f"Compute the sum of {a} and {b}."])
    return wording, "", str(a + b)


def _upper(rng):
    words = " ".join(rng.sample(_WORDS, rng.randint(2, 5)))
    wording = rng.choice(["Convert the text to upper case.", "Write this in capital letters.", "Uppercase this:"])
    return wording, words, words.upper()


def _capital(rng):
    country = rng.choice(sorted(_CAPITALS))
    wording = rng.choice([f"What is the capital of {country}?", f"Name the capital city of {country}.",
                          f"{country}'s capital is which city?"])
    return wording, "", f"The capital of {country} is {_CAPITALS[country]}."


_TASKS = (_reverse, _sort, _add, _upper, _capital)


def generate_instruction_records(n: int, seed: int = 0, multi_turn_fraction: float = 0.0) -> list[dict]:
    """`n` Alpaca-style records ({instruction, input, output}) from templated tasks; a fraction of them
    (`multi_turn_fraction`) are two- or three-turn chat records ({messages: [...]}) instead."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if rng.random() < multi_turn_fraction:
            messages = []
            for _ in range(rng.randint(2, 3)):
                instruction, inp, output = rng.choice(_TASKS)(rng)
                messages.append({"role": "user", "content": instruction + ("\n\n" + inp if inp else "")})
                messages.append({"role": "assistant", "content": output})
            out.append({"messages": messages})
        else:
            instruction, inp, output = rng.choice(_TASKS)(rng)
            out.append({"instruction": instruction, "input": inp, "output": output})
    return out


def _wrong_answer(rng, output: str) -> str:
    """A plausible but wrong answer: the right one's words shuffled, or a number off by a little."""
    if output.isdigit():
        return str(int(output) + rng.choice([-11, -1, 1, 10]))
    words = output.split()
    for _ in range(8):
        rng.shuffle(words)
        if " ".join(words) != output:
            return " ".join(words)
    return output + " " + rng.choice(_WORDS)


PREFERENCE_LAYOUTS = ("prompt", "conversational", "sharegpt")


def generate_preference_records(n: int, seed: int = 0, layout: str = "prompt") -> list[dict]:
    """`n` preference pairs from the templated tasks (chosen: the right answer; rejected: a wrong one), as
    'prompt' ({prompt, chosen, rejected} strings), 'conversational' (TRL: message lists, chosen/rejected the
    assistant turn) or 'sharegpt' ({conversations, chosen, rejected} with from/value dicts)."""
    if layout not in PREFERENCE_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(PREFERENCE_LAYOUTS)}")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        instruction, inp, output = rng.choice(_TASKS)(rng)
        prompt, wrong = instruction + ("\n\n" + inp if inp else ""), _wrong_answer(rng, output)
        if layout == "prompt":
            out.append({"prompt": prompt, "chosen": output, "rejected": wrong})
        elif layout == "conversational":
            out.append({"prompt": [{"role": "user", "content": prompt}],
                        "chosen": [{"role": "assistant", "content": output}],
                        "rejected": [{"role": "assistant", "content": wrong}]})
        else:
            out.append({"conversations": [{"from": "human", "value": prompt}],
                        "chosen": {"from": "gpt", "value": output}, "rejected": {"from": "gpt", "value": wrong}})
    return out


def make_preference_dataset(output: str, tokenizer_path: str, n: int = 32, *, seq_len: int = 128,
                            template: str = "plain", seed: int = 0, overwrite: bool = False) -> dict:
    """A small packed preference dataset (pack_dataset.py --task preference on generated pairs), for tests
    and demos; returns the manifest."""
    from witscale.data.pack import PackOptions, pack_records
    return pack_records(generate_preference_records(n, seed), tokenizer_path, output,
                        PackOptions(seq_len=seq_len, template=template, task="preference"), overwrite=overwrite)


def train_sentencepiece(texts, out_dir: str, vocab_size: int = 1024) -> str:
    """Train a small BPE SentencePiece model (byte fallback, newlines kept, the chat specials as user-defined
    symbols; unk=0, bos=1, eos=2, pad=3) and return the path of the .model file."""
    import sentencepiece as spm
    os.makedirs(out_dir, exist_ok=True)
    prefix = os.path.join(out_dir, "tokenizer")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)), model_prefix=prefix, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=1.0, user_defined_symbols=CHAT_SPECIALS, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        hard_vocab_limit=False, num_threads=1, minloglevel=2, max_sentence_length=1 << 16)
    return prefix + ".model"
