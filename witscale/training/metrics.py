"""Rank-0 metrics sinks: metrics.jsonl (one object per step), TensorBoard scalars, Weights & Biases
(--report-to wandb), and the console.

On a TTY the console gets a progress bar with ETA, the current loss and tokens/s (tqdm), and a second bar
while an evaluation runs; every console log line (witscale's, DeepSpeed's: the root logger's stream
handlers) is written through tqdm's writer meanwhile, so no line lands inside a bar. Otherwise (SLURM logs)
plain lines every ``log_every`` steps.
"""
from __future__ import annotations

import json
import logging
import math
import os
import secrets
import sys
from typing import Optional

log = logging.getLogger("witscale")

# metrics.jsonl key → TensorBoard tag
TB_TAGS = {
    "loss": "train/loss", "prompt_nll": "train/prompt_nll", "response_nll": "train/response_nll",
    "tokens_per_s": "perf/tokens_per_s", "lr": "train/lr", "grad_norm": "train/grad_norm",
    "packing_efficiency": "data/packing_efficiency", "mfu": "perf/mfu", "peak_memory_gib": "perf/peak_memory_gib",
    "eval_loss": "eval/loss", "eval_response_nll": "eval/response_nll", "eval_prompt_nll": "eval/prompt_nll",
}


def tb_tag(key: str):
    """The TensorBoard tag of a metrics.jsonl key (None: not plotted). Per-class mean NLLs ``nll_<class>``
    and ``eval_nll_<class>`` go to train_class_nll/<class> and eval_class_nll/<class>; an objective's own
    metrics (``Objective.metric_tags``, e.g. DPO's rewards and log-probs) to train_<tag> (eval_<tag>)."""
    from witscale.training.objectives import metric_tags
    if key in TB_TAGS:
        return TB_TAGS[key]
    objective_tags = metric_tags()
    if key in objective_tags:
        return "train_" + objective_tags[key]
    if key.startswith("eval_") and key[len("eval_"):] in objective_tags:
        return "eval_" + objective_tags[key[len("eval_"):]]
    if key.startswith("lambda_"):       # --learn-weights: the learned λ per group
        return "learned_weights/" + key[len("lambda_"):]
    if key.startswith("eval_nll_"):
        return "eval_class_nll/" + key[len("eval_nll_"):]
    if key.startswith("nll_"):
        return "train_class_nll/" + key[len("nll_"):]
    return None


REPORT_SINKS = ("tensorboard", "wandb", "none")


def parse_report_to(spec: str, no_tensorboard: bool = False) -> list[str]:
    """--report-to 'tensorboard,wandb' → the sinks besides metrics.jsonl (always written); 'none': none."""
    sinks = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in sinks if s not in REPORT_SINKS]
    if unknown:
        raise ValueError(f"--report-to: unknown '{unknown[0]}' (known: {', '.join(REPORT_SINKS)})")
    if "none" in sinks and len(sinks) > 1:
        raise ValueError("--report-to: 'none' cannot be combined with other sinks")
    return [s for s in sinks if s != "none" and not (no_tensorboard and s == "tensorboard")]


class WandbSink:
    """Weights & Biases (``witscale[wandb]``), rank 0 only: the run's resolved config (every setting, the
    weight table — the λ values per class — the layout, the filled DeepSpeed config) and every metric under
    its TensorBoard tag (train/loss, train_class_nll/<class>, eval_class_nll/<class>, …). WANDB_PROJECT,
    WANDB_MODE (offline), WANDB_DIR as wandb reads them; the run id is kept in <output-dir>/wandb_run_id so a
    resumed run continues the same W&B run."""

    def __init__(self, output_dir: str, config: dict):
        import wandb
        id_file = os.path.join(output_dir, "wandb_run_id")
        run_id = open(id_file, encoding="utf-8").read().strip() if os.path.exists(id_file) else secrets.token_hex(4)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "witscale"), id=run_id, resume="allow",
                              name=os.path.basename(os.path.abspath(output_dir)), config=config,
                              dir=os.environ.get("WANDB_DIR") or output_dir)
        if not os.path.exists(id_file):
            tmp = f"{id_file}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(run_id)
            os.replace(tmp, id_file)

    def write(self, record: dict, step: int) -> None:
        values = {tb_tag(k): v for k, v in record.items()
                  if tb_tag(k) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if values:
            self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricsLogger:
    def __init__(self, output_dir: Optional[str], total_steps: int, *, enabled: bool, log_every: int = 1,
                 tensorboard: bool = True, start_step: int = 0, wandb_config: Optional[dict] = None,
                 objective=None):
        """wandb_config: report to W&B (rank 0) with this resolved config; None: no W&B. objective: the run's
        (its ``console`` writes the middle of the plain log line; default: ``default_objective()``)."""
        if objective is None:
            from witscale.training.objectives import default_objective
            objective = default_objective()
        self.objective = objective
        self.enabled = enabled
        self._wandb = None
        self.total_steps = total_steps
        self.log_every = max(1, log_every)
        self._jsonl = None
        self._tb = None
        self._bar = None
        self._eval_bar = None
        self._redirect = None
        if not enabled:
            return
        if output_dir:
            os.makedirs(output_dir, exist_ok=True)
            self._jsonl = open(os.path.join(output_dir, "metrics.jsonl"), "a", encoding="utf-8")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(log_dir=os.path.join(output_dir, "tensorboard"))
            if wandb_config is not None:
                self._wandb = WandbSink(output_dir, wandb_config)
        if sys.stderr.isatty():
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
            # The console handlers of the root logger (where witscale's and DeepSpeed's records go) write
            # through tqdm.write while the bar lives: the bar is cleared, the line printed, the bar redrawn.
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()

    def eval_progress(self):
        """A ``progress(done, total)`` callback for Trainer.evaluate drawing an evaluation bar (None off a TTY)."""
        if self._bar is None:
            return None

        def progress(done: int, total: int) -> None:
            from tqdm import tqdm
            if self._eval_bar is None:
                self._eval_bar = tqdm(total=total, desc="eval", unit="batch", leave=False, dynamic_ncols=True)
            self._eval_bar.update(done - self._eval_bar.n)
            if done >= total:
                self._eval_bar.close()
                self._eval_bar = None
        return progress

    def write(self, record: dict) -> None:
        """Record one step (or eval) result: jsonl, TensorBoard, console."""
        if not self.enabled:
            return
        step = int(record["step"])
        if self._jsonl is not None:
            # NaN (e.g. no response token in a batch) and inf (a non-finite step) are not JSON: write null.
            clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
            self._jsonl.write(json.dumps(clean) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for key, value in record.items():
                tag = tb_tag(key)
                if tag and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(tag, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.write(record, step)
        if "loss" not in record:        # an eval record
            log.info(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()
                              if not k.startswith(("nll_", "eval_nll_"))))
            return
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", resp_nll=f"{record['response_nll']:.3f}",
                                  tok_s=f"{record['tokens_per_s']:.0f}")
        elif step % self.log_every == 0 or step == self.total_steps:
            gn = record.get("grad_norm")
            middle = self.objective.console(record)
            middle += "".join(f"λ_{k[len('lambda_'):]} {v:.4g} " for k, v in record.items() if k.startswith("lambda_"))
            log.info(f"step {step}/{self.total_steps} loss {record['loss']:.4f} {middle}"
                     f"lr {record['lr']:.3g} grad_norm {'-' if gn is None else f'{gn:.3f}'} "
                     f"tok/s {record['tokens_per_s']:.0f}")

    def close(self) -> None:
        for sink in (self._jsonl, self._tb, self._wandb, self._eval_bar, self._bar):
            if sink is not None:
                sink.close()
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
        self._jsonl = self._tb = self._wandb = self._bar = self._eval_bar = self._redirect = None
