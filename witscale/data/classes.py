"""Token classes: one small integer per token, stored in the packed data (uint8).

The packed dataset never stores loss weights for the classes; the trainer looks each class up in a
weight table at train time, so one packed dataset serves a whole (λp, λr) grid.

Ids 0..5 are the original table; reasoning, tool_call and tool were appended later, so data packed before
keeps its meaning. Every manifest records the table it was written with (``class_table``: name → id); a
manifest without one was written with :data:`LEGACY_CLASS_NAMES`.
"""
from __future__ import annotations

import enum


class TokenClass(enum.IntEnum):
    PAD = 0        # padding after the last document of a row; never predicted, weight always 0
    TEMPLATE = 1   # BOS, role headers, separators and other template/special tokens
    SYSTEM = 2     # system prompt content, and the tool schemas offered to the model
    PROMPT = 3     # user turns (the instruction / input)
    RESPONSE = 4   # assistant content
    EOT = 5        # end-of-turn markers and EOS closing an assistant turn
    REASONING = 6  # the assistant's reasoning / thinking trace, with its <think> … </think> markers
    TOOL_CALL = 7  # the assistant's tool calls, with the template's call syntax around them
    TOOL = 8       # results returned by tools (tool / observation / ipython messages)


NUM_CLASSES = len(TokenClass)
CLASS_NAMES = [c.name.lower() for c in TokenClass]
# The table of packed data written before reasoning/tool_call/tool existed (manifests without a class table).
LEGACY_CLASS_NAMES = CLASS_NAMES[:6]

# The paper's mapping (Chatterjee et al. 2025): everything in the prompt string gets λp, the response and
# the EOS appended to it get λr. What the model is given (tool results) is prompt-side; what it generates
# (reasoning, tool calls) is response-side. PAD is never weighted.
PROMPT_SIDE = (TokenClass.TEMPLATE, TokenClass.SYSTEM, TokenClass.PROMPT, TokenClass.TOOL)
RESPONSE_SIDE = (TokenClass.RESPONSE, TokenClass.EOT, TokenClass.REASONING, TokenClass.TOOL_CALL)


def class_from_name(name: str) -> TokenClass:
    try:
        return TokenClass[name.strip().upper()]
    except KeyError:
        raise ValueError(f"unknown token class {name!r}; known classes: {', '.join(CLASS_NAMES)}") from None


def class_table() -> dict[str, int]:
    """The table written into every manifest: class name → id."""
    return {name: i for i, name in enumerate(CLASS_NAMES)}


def check_class_table(table) -> list[str]:
    """The class names (by id) of a manifest's ``class_table``; None (absent) means the legacy 6-class table.

    Raises ValueError when the table names a class this witscale does not know or gives a known class
    another id: the data would be weighted wrongly."""
    if table is None:
        return list(LEGACY_CLASS_NAMES)
    if not isinstance(table, dict) or not table:
        raise ValueError(f"class_table must be a non-empty object of name: id, got {table!r}")
    names = {}
    for name, cid in table.items():
        if isinstance(cid, bool) or not isinstance(cid, int):
            raise ValueError(f"class_table: id of {name!r} is not an integer: {cid!r}")
        if name not in CLASS_NAMES:
            raise ValueError(f"class_table has class {name!r} (id {cid}), which this witscale does not know "
                             f"(known: {', '.join(CLASS_NAMES)}); the data was packed by a newer witscale")
        if CLASS_NAMES.index(name) != cid:
            raise ValueError(f"class_table gives {name!r} id {cid}, this witscale has it at id "
                             f"{CLASS_NAMES.index(name)}")
        names[cid] = name
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"class_table ids are not 0..{len(names) - 1}: {sorted(names)}")
    return [names[i] for i in range(len(names))]
