"""The class → loss-weight table, built from --prompt-weight/--response-weight/--class-weights.

The packed data stores a class per token; the weight of a *predicted* token is looked up here at train
time (times the optional explicit weight channel of the data). The paper's mapping: template, system and
prompt classes get λp; response and end-of-turn get λr; pad is always 0.
"""
from __future__ import annotations

import math

import numpy as np

from witscale.data.classes import CLASS_NAMES, NUM_CLASSES, PROMPT_SIDE, RESPONSE_SIDE, TokenClass, class_from_name


# The objective's vocabulary (docs/objective.md): a target of IGNORE_INDEX predicts nothing, and the
# global-batch denominator N is one of NORMALIZATIONS.
IGNORE_INDEX = -100
NORMALIZATIONS = ("nonzero", "weight_sum", "tokens")


def denominators_of(labels: np.ndarray, weights: np.ndarray) -> dict[str, float]:
    """This batch's share of each normalization's denominator: predicted tokens with non-zero weight
    ('nonzero', the paper's), Σ w ('weight_sum'), all predicted tokens ('tokens')."""
    predicted = labels != IGNORE_INDEX
    return {
        "nonzero": float(np.count_nonzero(predicted & (weights > 0))),
        "weight_sum": float(weights[predicted].sum(dtype=np.float64)),
        "tokens": float(np.count_nonzero(predicted)),
    }


def _check_weight(name: str, value: float) -> float:
    value = float(value)
    if math.isnan(value) or math.isinf(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def parse_class_weights(spec: str) -> dict[TokenClass, float]:
    """Parse 'template=0,system=0.1' into {TokenClass.TEMPLATE: 0.0, TokenClass.SYSTEM: 0.1}."""
    out: dict[TokenClass, float] = {}
    for item in filter(None, (part.strip() for part in (spec or "").split(","))):
        if "=" not in item:
            raise ValueError(f"--class-weights entry {item!r} is not of the form class=weight")
        name, value = item.split("=", 1)
        cls = class_from_name(name)
        if cls == TokenClass.PAD:
            raise ValueError("--class-weights cannot weight 'pad': padding is never predicted")
        try:
            out[cls] = _check_weight(f"--class-weights {name.strip()}", float(value))
        except ValueError as e:
            if "must be" in str(e):
                raise
            raise ValueError(f"--class-weights {name.strip()}: {value!r} is not a number") from None
    return out


def build_weight_table(prompt_weight: float, response_weight: float,
                       overrides: dict[TokenClass, float] | None = None) -> np.ndarray:
    """float32 [NUM_CLASSES] table: λp for prompt-side classes, λr for response-side, overrides on top."""
    table = np.zeros(NUM_CLASSES, dtype=np.float32)
    lp = _check_weight("--prompt-weight", prompt_weight)
    lr = _check_weight("--response-weight", response_weight)
    for cls in PROMPT_SIDE:
        table[cls] = lp
    for cls in RESPONSE_SIDE:
        table[cls] = lr
    for cls, w in (overrides or {}).items():
        table[cls] = w
    table[TokenClass.PAD] = 0.0
    return table


def describe_weight_table(table: np.ndarray) -> str:
    return ", ".join(f"{CLASS_NAMES[i]}={float(table[i]):g}" for i in range(NUM_CLASSES))
