"""The ``Objective`` interface: what a training objective declares, and what the trainer asks of it
(docs/objective.md#adding-an-objective).

An objective is a class registered by name (``witscale.training.objectives.register``); an instance holds one
run's settings. The trainer, train.py, metrics, the sweep report and tools/precompute_reference.py only ask
it; none of them names an objective. What it declares:

- data: ``data_task``, the packed dataset's task it trains on ('sft' or 'preference'), and ``check_data``;
- settings: ``flags`` (the RunConfig fields that are its own: refused when another objective is chosen),
  ``defaults`` (filled where not given), ``default_lr``; ``from_config`` / ``check`` / ``describe``;
- the step: ``inputs(mb)`` (the micro-batch tensors its head hook needs; under pp they travel to the last
  stage in the labels tuple), ``head(*inputs)`` (the hook ``VocabParallelLMHead.forward(objective=)`` calls,
  or None for the plain weighted loss), ``denominator(normalization)`` (the global count the step's loss is
  divided by), ``sums`` (the names of the float64 sums its hook returns, summed over the global batch);
- metrics: ``metrics(sums)`` (metrics.jsonl keys from the global sums), ``metric_tags`` (their TensorBoard
  tags), ``console(record)`` (the log line's middle), ``sweep_metrics`` (what tools/collect_sweep.py compares).
"""
from __future__ import annotations

from typing import Callable, ClassVar, NamedTuple, Optional

import torch


class HeadStats(NamedTuple):
    """What an objective's head hook returns for one micro-batch. A NamedTuple, as the kernel's ``LossStats``:
    ZeRO-3 must find ``weighted_sum`` among the module's outputs to re-gather the head's weight for backward."""
    weighted_sum: torch.Tensor     # scalar the engine backpropagates (× the step's scale); its value may be a
    #                                surrogate whose gradient is the objective's (pair objectives)
    class_nll_sum: torch.Tensor    # [C] float64, as LossStats: Σ NLL of the predicted tokens of each class
    class_count: torch.Tensor      # [C] float64
    sums: torch.Tensor             # [len(objective.sums)] float64, detached; sums[0] is the loss numerator


class Objective:
    """Base class of the objectives; the defaults are SFT's (the weighted token loss)."""

    name: ClassVar[str] = ""                   # --objective NAME (the registry's key)
    data_task: ClassVar[str] = "sft"           # the packed dataset's manifest "task" it trains on
    default_lr: ClassVar[float] = 2e-5         # --lr when not given
    defaults: ClassVar[dict] = {}              # RunConfig field → value filled when the field is None
    flags: ClassVar[dict] = {}                 # RunConfig field → flag, for the fields that are its own
    # The float64 sums its head hook returns (``HeadStats.sums``), summed over the global batch and crossing to
    # the host once per step. sums[0] is the loss numerator (the step's loss = it / denominator). () for an
    # objective whose hook returns the kernel's LossStats: its numerator is ``weighted_sum``.
    sums: ClassVar[tuple] = ()
    metric_tags: ClassVar[dict] = {}           # metrics.jsonl key → TensorBoard tag (train_/eval_ prefixed)
    sweep_metrics: ClassVar[dict] = {}         # metrics.jsonl key → higher is better (tools/collect_sweep.py)
    # Scaling every class weight by c trains the same model under --normalization weight_sum (and the others
    # without clipping): tools/collect_sweep.py then groups the (λp, λr) cells of one ratio (evaluation/sweep.py).
    weight_ratio_invariant: ClassVar[bool] = False

    # --- settings ----------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg) -> "Objective":
        """This objective with a run's settings (a ``RunConfig`` whose ``defaults`` are filled)."""
        return cls()

    def check(self) -> None:
        """One-line ValueErrors for settings that cannot work (before anything starts)."""

    def check_data(self, manifest: dict, path: str, table, cfg, flag: str = "--data") -> None:
        """One-line ValueError (naming ``flag`` and ``path``) when the dataset at ``path`` (``manifest`` its
        manifest; ``table`` the run's class weights; ``cfg`` the RunConfig) cannot serve this objective."""

    def describe(self) -> str:
        """The objective and its settings, in a few words."""
        return self.name

    def startup_line(self, weights: str, normalization: str) -> str:
        """train.log's line on the loss (``weights`` the class-weight table as text)."""
        return f"loss weights per class: {weights}; normalization: {normalization}"

    # --- the step -------------------------------------------------------------------------------------------
    def denominator(self, normalization: str) -> str:
        """The key of the global count the step's loss is divided by: one of ``StepBatch.denominators``
        (known before the forward pass) and, in evaluation, of the summed denominators or ``sums``."""
        return normalization

    def inputs(self, mb) -> tuple:
        """The micro-batch's tensors ``head`` needs (on the engine's device; under pp they ride with the labels
        to the last stage). () when ``head`` needs none."""
        return ()

    def head(self, *inputs) -> Optional[Callable]:
        """The LM head's objective hook for one micro-batch, or None for the kernel's weighted loss. The hook is
        called as ``hook(fused_loss, h, labels, weights, target_classes)`` inside the head's forward (ZeRO-3
        has gathered the head's weight; ``fused_loss`` may run several times) on flattened [T] inputs, and
        returns a ``HeadStats`` (under torch.no_grad, evaluation: its ``weighted_sum`` is not used)."""
        return None

    # --- metrics --------------------------------------------------------------------------------------------
    def metrics(self, sums: dict, prefix: str = "") -> dict:
        """metrics.jsonl entries from the global batch's ``sums`` (name → value), keys prefixed (``eval_``)."""
        return {}

    def console(self, record: dict) -> str:
        """The middle of the plain console line of a training record."""
        return f"prompt_nll {record['prompt_nll']:.4f} response_nll {record['response_nll']:.4f} "


__all__ = ["HeadStats", "Objective"]
