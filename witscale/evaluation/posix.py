"""POSIX, the prompt-sensitivity index (Chatterjee et al., EMNLP Findings 2024), as the WIT paper uses it.

For a set of N intent-preserving variants x_1..x_N of one prompt, y_j is the greedy response to x_j, and

    ψ = 1/(N(N−1)) · Σ_i Σ_{j≠i} |log P(y_j | x_i) − log P(y_j | x_j)| / L(y_j)

with L(y_j) the number of tokens of y_j. POSIX is the mean ψ over the prompt sets; lower is more robust
(0: every response is exactly as likely whichever variant asked for it).

What is computed, precisely:
* x_i is rendered with the packer's template (witscale/evaluation/prompting.py); y_j is the generated token
  sequence up to and including the stop token (EOS / end of turn) when the model stopped, else its
  ``max_new_tokens`` tokens; L(y_j) counts exactly the tokens scored. Nothing after the stop is scored.
* log P(y_j | x_i) is Σ over y_j's tokens of log p(token | x_i, earlier tokens of y_j), teacher-forced by
  witscale's model on packed rows (witscale/evaluation/scoring.py) — the diagonal included, so both terms of
  each difference come from the same computation.
* The public reference implementation (PyPI ``prompt-sensitivity-index``) divides every term by
  ``max_new_tokens`` instead of L(y_j); its batched mode also scores the padding after an early EOS. Where
  every response runs to ``max_new_tokens`` the two normalizations agree. To compare with numbers from it,
  ``posix_max_new_tokens`` (the same matrices, divided by ``max_new_tokens``) is reported beside ``posix``.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from witscale.evaluation.prompting import PromptFormatter, decode, strip_stop
from witscale.evaluation.variants import PromptSet

DEFINITION = ("psi = 1/(N(N-1)) * sum_i sum_{j!=i} |log P(y_j|x_i) - log P(y_j|x_j)| / L(y_j); "
              "POSIX = mean psi over prompt sets; lower is more robust")


def psi(logprobs, lengths: Sequence[int]) -> float:
    """ψ of one set: ``logprobs[i][j]`` = log P(y_j | x_i), ``lengths[j]`` = L(y_j) (or one constant for all)."""
    m = np.asarray(logprobs, dtype=np.float64)
    n = m.shape[0]
    if m.shape != (n, n) or n < 2:
        raise ValueError(f"a prompt set needs an N×N matrix with N ≥ 2, got shape {m.shape}")
    lengths = np.broadcast_to(np.asarray(lengths, dtype=np.float64), (n,))
    if (lengths <= 0).any():
        raise ValueError("response lengths must be positive")
    diff = np.abs(m - np.diag(m)[None, :]) / lengths[None, :]     # [i, j]: |M[i,j] − M[j,j]| / L_j
    np.fill_diagonal(diff, 0.0)
    return float(diff.sum() / (n * (n - 1)))


def set_prefixes(sets: Sequence[PromptSet], formatter: PromptFormatter) -> list[list[list[int]]]:
    return [[formatter.prefix(x) for x in s.variants] for s in sets]


def generate_responses(generator, prefixes: list[list[list[int]]], formatter: PromptFormatter, max_new_tokens: int,
                       batch_size: int, progress: Optional[Callable[[int], None]] = None) -> list[list[list[int]]]:
    """Greedy responses, per set and variant (token ids, stop token included)."""
    from witscale.evaluation.models import greedy_generate

    flat = [p for ps in prefixes for p in ps]
    out = greedy_generate(generator, flat, formatter.stop_ids, formatter.tokenizer.pad_id, max_new_tokens,
                          batch_size, progress)
    res, k = [], 0
    for ps in prefixes:
        res.append(out[k:k + len(ps)])
        k += len(ps)
    return res


def score_matrices(scorer, prefixes: list[list[list[int]]], responses: list[list[list[int]]], max_tokens: int,
                   progress: Optional[Callable[[int], None]] = None) -> list[np.ndarray]:
    """Per set, M[i, j] = log P(y_j | x_i) for all N² pairs, all sets packed together."""
    from witscale.evaluation.scoring import continuation_logprobs

    pairs, where = [], []
    for s, (ps, ys) in enumerate(zip(prefixes, responses)):
        for i, p in enumerate(ps):
            for j, y in enumerate(ys):
                pairs.append((p, y))
                where.append((s, i, j))
    values = continuation_logprobs(scorer, pairs, max_tokens=max_tokens, progress=progress)
    mats = [np.zeros((len(ps), len(ps))) for ps in prefixes]
    for (s, i, j), v in zip(where, values):
        mats[s][i, j] = v
    return mats


def set_results(sets: Sequence[PromptSet], prefixes, responses, matrices, formatter: PromptFormatter,
                max_new_tokens: int) -> list[dict]:
    out = []
    for s, ps, ys, m in zip(sets, prefixes, responses, matrices):
        lengths = [len(y) for y in ys]
        stops = set(formatter.stop_ids)
        out.append({
            "id": s.id, "kind": s.kind, "variants": s.variants, "edits": s.edits,
            "prompt_tokens": [len(p) for p in ps],
            "responses": [decode(formatter.tokenizer, strip_stop(y, formatter.stop_ids)) for y in ys],
            "response_tokens": ys, "response_lengths": lengths,
            "stopped": [bool(y) and y[-1] in stops for y in ys],
            "logprobs": m.tolist(),
            "psi": psi(m, lengths), "psi_max_new_tokens": psi(m, max_new_tokens)})
    return out


def summarize(results: Sequence[dict], *, template: str, max_new_tokens: int) -> dict:
    """The ``posix`` section of eval_results.json from per-set results (of all ranks)."""
    if not results:
        raise ValueError("no prompt sets")
    kinds = sorted({r["kind"] for r in results})
    return {
        "posix": float(np.mean([r["psi"] for r in results])),
        "posix_by_kind": {k: float(np.mean([r["psi"] for r in results if r["kind"] == k])) for k in kinds},
        "posix_max_new_tokens": float(np.mean([r["psi_max_new_tokens"] for r in results])),
        "num_sets": len(results), "num_variants": int(sum(len(r["variants"]) for r in results)),
        "stopped_fraction": float(np.mean([s for r in results for s in r["stopped"]])),
        "template": template, "max_new_tokens": max_new_tokens,
        "definition": DEFINITION,
        "normalization": "L(y_j), the response's token count (paper); posix_max_new_tokens divides by "
                         "max_new_tokens as the reference implementation (prompt-sensitivity-index) does",
        "sets": list(results)}
