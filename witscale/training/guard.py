"""The non-finite guard: what a step with a NaN or inf loss or gradient norm does to the run.

Every optimizer skips a step whose gradient norm is not finite before it touches the weights (DeepSpeed's
ZeRO-1/2/3 and bf16 optimizers by their overflow check, fp32 ZeRO-0 by ``GlobalNormClipping``); the trainer
learns of it from the step's statistics, after the one host transfer of the step (``Trainer.train_step``
sets ``StepResult.nonfinite`` and ``update_skipped``). Every rank sees the same numbers (the statistics are
summed over dp and broadcast over pp; the norm is global), so every rank takes the same decision here,
without a collective of its own:

- by default the run stops: ``NonFiniteError`` naming the step and its rows; nothing is saved after it;
- with ``--skip-nonfinite N`` a skipped update is logged and training goes on, at most N times in the run
  (the steps are recorded in the checkpoint's state, so a resumed run counts on); the next one stops;
- a non-finite step whose update *was* applied (a non-finite loss with a finite gradient norm) always stops.

docs/checkpoints.md#non-finite-steps.
"""
from __future__ import annotations

import logging

log = logging.getLogger("witscale")


class NonFiniteError(RuntimeError):
    """A non-finite loss, gradient norm or weight: the run stops without saving (exit 3, one line)."""


def describe_rows(rows, limit: int = 8) -> str:
    """The dataset rows of a global batch, shortened: 'rows 12, 7, 40 (3 rows)'."""
    shown = ", ".join(str(int(r)) for r in rows[:limit])
    return f"rows {shown}{', …' if len(rows) > limit else ''} ({len(rows)} rows)"


def check_step(result, batch, rows, skipped: list[int], max_skips: int) -> None:
    """After a step: return if it was finite, or skipped within the budget (appended to ``skipped``, logged);
    else raise ``NonFiniteError``. ``rows()`` gives the dataset rows of the step's global batch (asked for only
    when the step was not finite)."""
    if not result.nonfinite:
        return
    rows = rows()
    norm = "not measured" if result.raw_grad_norm is None else result.raw_grad_norm
    what = f"step {result.step}: non-finite loss or gradient norm (loss {result.loss}, gradient norm {norm})"
    what += f" at data epoch {batch.epoch}, step {batch.step_in_epoch} of the epoch, {describe_rows(rows)}"
    if not result.update_skipped:
        raise NonFiniteError(f"{what}; the update was applied, so the run stops here without saving "
                             f"(the last checkpoint holds finite values)")
    if len(skipped) >= max_skips:
        budget = (f"--skip-nonfinite {max_skips} already used by steps {', '.join(map(str, skipped))}" if skipped
                  else "pass --skip-nonfinite N to skip up to N such steps")
        raise NonFiniteError(f"{what}; update not applied, run stopped without saving ({budget})")
    skipped.append(result.step)
    log.warning(f"{what}: update skipped ({len(skipped)} of --skip-nonfinite {max_skips})")
