"""One evaluation of one exported model, as tools/evaluate.py runs it: check every input, generate (POSIX
responses, judge-benchmark answers) with the transformers model, score POSIX pairs with witscale's model,
run lm-eval, and merge everything into ``<output>/eval_results.json``.

Each part (``posix``, ``generations/<benchmark>``, ``tasks/<task>``) that fails is recorded under ``errors`` and
the others still run; ``evaluate`` returns the errors (the CLI exits 1 when there are any). Inputs are
checked before any model is loaded: a bad file or an unknown option costs a second, not a model load.

``evaluate`` is a sequence of phases over one ``EvalRun`` (options, checked inputs, ranks, device; the errors,
timings and result sections the phases record), each phase a function tested on its own
(tests/test_evaluate_phases.py): ``generation_phase`` → ``posix_scoring_phase`` → ``judge_files_phase`` →
``harness_tasks_phase`` → ``write_report`` (rank 0). Under torchrun every rank runs every phase on its shard;
the phases that gather (POSIX scoring, judge files) are reached by every rank, failed or not.
"""
from __future__ import annotations

import logging
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence

from witscale.evaluation import harness, judge
from witscale.evaluation.parallel import DataParallel
from witscale.evaluation.variants import KINDS, PromptSet, read_prompt_sets

if TYPE_CHECKING:
    import torch

log = logging.getLogger("witscale.evaluation")


@dataclass
class EvalOptions:
    model_dir: str
    output_dir: str
    tokenizer: Optional[str] = None
    template: str = "plain"
    system: Optional[str] = None
    # POSIX
    posix: Optional[str] = None
    posix_kinds: Sequence[str] = KINDS
    posix_seed: int = 0
    max_new_tokens: int = 64
    # lm-eval
    tasks: Sequence[str] = ()
    include_path: Optional[str] = None
    preset: str = "paper"
    num_fewshot: Optional[int] = None
    backend: str = "auto"
    lm_eval_batch_size: Optional[str] = None        # None: auto on a GPU, 8 on the CPU
    task_metrics: dict = field(default_factory=dict)
    lm_eval_model_args: dict = field(default_factory=dict)
    # judge-based benchmarks
    alpaca_eval: Optional[str] = None
    mt_bench: Optional[str] = None
    judge_max_new_tokens: int = 1024
    model_id: Optional[str] = None
    # common
    limit: Optional[int] = None
    batch_size: int = 16
    max_tokens: int = 8192
    device: str = "auto"
    dtype: str = "auto"
    attention: str = "auto"
    progress: bool = True


def default_tokenizer(model_dir: str) -> str:
    """The tokenizer the packer used, as exported: a bare SentencePiece model (``tokenizer.model`` without a
    ``tokenizer.json``) is read as such; otherwise the directory (an HF fast tokenizer)."""
    sp = os.path.join(model_dir, "tokenizer.model")
    if os.path.exists(sp) and not os.path.exists(os.path.join(model_dir, "tokenizer.json")):
        return sp
    return model_dir


def default_model_id(opts: EvalOptions) -> str:
    """The cell's directory name for a sweep's ``<cell>/hf``, else the model directory's name."""
    path = os.path.abspath(opts.model_dir).rstrip("/")
    name = os.path.basename(path)
    return os.path.basename(os.path.dirname(path)) if name in ("hf", "exported_hf") else name


class InputError(ValueError):
    """Bad options or input files, found before any model is loaded."""


def check_inputs(opts: EvalOptions) -> dict:
    """Everything that can be checked without a model. Returns the parsed inputs."""
    if not os.path.isfile(os.path.join(opts.model_dir, "config.json")):
        raise InputError(f"--model {opts.model_dir}: not an HF model directory (no config.json)")
    if not (opts.posix or opts.tasks or opts.alpaca_eval or opts.mt_bench):
        raise InputError("nothing to evaluate: give --posix, --tasks, --alpaca-eval and/or --mt-bench")
    for flag, value in (("--max-new-tokens", opts.max_new_tokens), ("--judge-max-new-tokens", opts.judge_max_new_tokens),
                        ("--batch-size", opts.batch_size), ("--max-tokens", opts.max_tokens)):
        if value < 1:
            raise InputError(f"{flag} must be ≥ 1, got {value}")
    if opts.limit is not None and opts.limit < 1:
        raise InputError(f"--limit must be ≥ 1, got {opts.limit}")
    inputs: dict = {}
    from witscale.data.tokenizer import load_tokenizer
    from witscale.evaluation.prompting import PromptFormatter

    tok_path = opts.tokenizer or default_tokenizer(opts.model_dir)
    try:
        inputs["formatter"] = PromptFormatter(opts.template, load_tokenizer(tok_path), opts.system)
    except (ValueError, OSError) as e:
        raise InputError(f"tokenizer/template: {e}") from None
    inputs["tokenizer_path"] = tok_path
    if opts.posix:
        try:
            sets = read_prompt_sets(opts.posix, opts.posix_kinds, opts.posix_seed)
        except ValueError as e:
            raise InputError(str(e)) from None
        inputs["sets"] = sets[:opts.limit] if opts.limit else sets
    for name, path, reader in (("alpaca_eval", opts.alpaca_eval, judge.read_alpaca_eval),
                               ("mt_bench", opts.mt_bench, judge.read_mt_bench)):
        if path:
            try:
                records = reader(path)
            except (OSError, ValueError) as e:
                raise InputError(f"--{name.replace('_', '-')} {path}: {e}") from None
            inputs[name] = records[:opts.limit] if opts.limit else records
    if opts.tasks:
        if harness.available() is None:
            raise InputError("--tasks needs lm-evaluation-harness: pip install 'witscale[eval]' (or lm-eval)")
        if opts.include_path and not os.path.isdir(opts.include_path):
            raise InputError(f"--include-path {opts.include_path}: no such directory")
        if opts.preset not in harness.PRESETS:
            raise InputError(f"--preset {opts.preset}: choose from {', '.join(harness.PRESETS)}")
        try:
            inputs["task_manager"] = harness.task_manager(list(opts.tasks), opts.preset, opts.include_path)
        except ValueError as e:
            raise InputError(f"--tasks: {e}") from None
    return inputs


class _Progress:
    """A tqdm bar on rank 0 (none elsewhere, or with --no-progress)."""

    def __init__(self, enabled: bool, total: int, desc: str):
        self.bar = None
        if enabled and total:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, desc=desc, mininterval=1.0, dynamic_ncols=True)

    def __call__(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _error(e: BaseException) -> str:
    log.error("".join(traceback.format_exception(type(e), e, e.__traceback__)))
    return f"{type(e).__name__}: {e}"


@dataclass
class EvalRun:
    """One evaluation in progress: what every phase reads (options, checked inputs, ranks, device) and what the
    phases record (``errors`` per part, ``timing`` per phase, ``new``: the sections of eval_results.json)."""
    opts: EvalOptions
    inputs: dict
    dp: DataParallel
    device: torch.device
    dtype: torch.dtype
    model_id: str
    errors: dict = field(default_factory=dict)
    timing: dict = field(default_factory=dict)
    new: dict = field(default_factory=dict)

    @classmethod
    def start(cls, opts: EvalOptions, dp: Optional[DataParallel] = None) -> EvalRun:
        """Checks every input (``InputError`` before any model is loaded) and picks the device and dtype."""
        from witscale.evaluation import models

        dp = dp or DataParallel()
        inputs = check_inputs(opts)
        device = models.pick_device(opts.device)
        return cls(opts=opts, inputs=inputs, dp=dp, device=device, dtype=models.pick_dtype(opts.dtype, device),
                   model_id=opts.model_id or default_model_id(opts),
                   new={"model": os.path.abspath(opts.model_dir), "attempted": []})

    @property
    def show(self) -> bool:
        return self.opts.progress and self.dp.is_main

    @property
    def formatter(self):
        return self.inputs.get("formatter")

    @property
    def sets(self) -> list[PromptSet]:
        return self.inputs.get("sets", [])

    @property
    def my_sets(self) -> list[int]:
        """Indices of the POSIX sets this rank generates and scores."""
        return self.dp.shard(len(self.sets))

    @property
    def judged(self) -> list[str]:
        return [n for n in ("alpaca_eval", "mt_bench") if n in self.inputs]


@dataclass
class Generations:
    """What the generation phase hands on: this rank's POSIX prefixes and responses (None when they failed or
    were not asked for) and its judge answers, ``{benchmark: [(record index, output)]}``."""
    prefixes: Optional[list] = None
    responses: Optional[list] = None
    judge: dict = field(default_factory=dict)


def evaluate(opts: EvalOptions, dp: Optional[DataParallel] = None) -> dict:
    """Run the evaluation; write eval_results.json on rank 0; returns {part: error} (empty: all fine)."""
    run = EvalRun.start(opts, dp)
    generated = generation_phase(run)
    posix_scoring_phase(run, generated)
    judge_files_phase(run, generated)
    harness_tasks_phase(run)
    if run.dp.is_main:
        write_report(run)
    return run.errors


def generation_phase(run: EvalRun) -> Generations:
    """1. POSIX responses and judge-benchmark answers, greedy, with the transformers model (loaded once, freed
    after). A failure is recorded under its part (``posix``, ``generations/<benchmark>``); the others go on."""
    from witscale.evaluation import models

    out = Generations()
    if not (run.sets or run.judged):
        return out
    t0 = time.time()
    try:
        generator = models.load_generator(run.opts.model_dir, run.device, run.dtype)
    except Exception as e:                  # noqa: BLE001 - recorded, the benchmarks may still run
        msg = _error(e)
        for part in (["posix"] if run.sets else []) + [f"generations/{n}" for n in run.judged]:
            run.errors[part] = f"loading the model for generation: {msg}"
        run.timing["generation"] = round(time.time() - t0, 2)
        return out
    if run.sets:
        try:
            out.prefixes, out.responses = _posix_responses(run, generator)
        except Exception as e:              # noqa: BLE001
            out.prefixes = out.responses = None
            run.errors["posix"] = _error(e)
    for name in run.judged:
        try:
            out.judge[name] = _judge_answers(run, generator, name)
        except Exception as e:              # noqa: BLE001
            run.errors[f"generations/{name}"] = _error(e)
    del generator
    models.free_memory()
    run.timing["generation"] = round(time.time() - t0, 2)
    return out


def _posix_responses(run: EvalRun, generator) -> tuple[list, list]:
    from witscale.evaluation import posix

    prefixes = posix.set_prefixes([run.sets[i] for i in run.my_sets], run.formatter)
    bar = _Progress(run.show, sum(len(p) for p in prefixes), "POSIX: generating")
    responses = posix.generate_responses(generator, prefixes, run.formatter, run.opts.max_new_tokens,
                                         run.opts.batch_size, bar)
    bar.close()
    return prefixes, responses


def _judge_answers(run: EvalRun, generator, name: str) -> list:
    """This rank's share of one judge benchmark's answers, as [(record index, output)]."""
    from witscale.evaluation import models
    from witscale.evaluation.prompting import decode, strip_stop

    records, formatter = run.inputs[name], run.formatter
    idx = run.dp.shard(len(records))
    part = [records[i] for i in idx]
    bar = _Progress(run.show, sum(len(r["turns"]) for r in part) if name == "mt_bench" else len(part),
                    f"{name}: generating")

    def generate(convs):
        ids = models.greedy_generate(generator, [formatter.prefix(c) for c in convs], formatter.stop_ids,
                                     formatter.tokenizer.pad_id, run.opts.judge_max_new_tokens, run.opts.batch_size)
        bar(len(convs))
        return [decode(formatter.tokenizer, strip_stop(y, formatter.stop_ids)) for y in ids]
    outs = (judge.alpaca_eval_outputs(part, generate, run.model_id) if name == "alpaca_eval"
            else judge.mt_bench_answers(part, generate, run.model_id))
    bar.close()
    return list(zip(idx, outs))


def posix_scoring_phase(run: EvalRun, generated: Generations) -> None:
    """2. The POSIX matrices scored with witscale's model on packed rows; every rank's sets gathered, and the
    summary put in ``run.new["posix"]`` on rank 0 — or the first rank's error under ``posix``."""
    from witscale.evaluation import models, posix

    if not run.sets:
        return
    run.new["attempted"].append("posix")
    t0 = time.time()
    mine = run.my_sets
    set_out = []
    if "posix" not in run.errors:
        try:
            scorer = models.load_scorer(run.opts.model_dir, run.device, run.dtype, run.opts.attention)
            bar = _Progress(run.show, sum(len(p) ** 2 for p in generated.prefixes), "POSIX: scoring")
            mats = posix.score_matrices(scorer, generated.prefixes, generated.responses, run.opts.max_tokens, bar)
            bar.close()
            del scorer
            models.free_memory()
            set_out = posix.set_results([run.sets[i] for i in mine], generated.prefixes, generated.responses, mats,
                                        run.formatter, run.opts.max_new_tokens)
        except Exception as e:              # noqa: BLE001
            run.errors["posix"] = _error(e)
    failed = [m for m in run.dp.all_ok("posix" not in run.errors, run.errors.get("posix", "")) if m]
    gathered = run.dp.gather(list(zip(mine, set_out)))
    if failed:
        run.errors["posix"] = failed[0]
    elif run.dp.is_main:
        run.new["posix"] = posix.summarize([r for _, r in gathered], template=run.opts.template,
                                           max_new_tokens=run.opts.max_new_tokens)
    run.timing["posix_scoring"] = round(time.time() - t0, 2)


def judge_files_phase(run: EvalRun, generated: Generations) -> None:
    """The judge answers of every rank gathered and written on rank 0 in the files AlpacaEval and FastChat read,
    each named under ``run.new["generations"]`` — or the first rank's error under ``generations/<benchmark>``."""
    for name in run.judged:
        part = f"generations/{name}"
        run.new["attempted"].append(part)
        failed = [m for m in run.dp.all_ok(part not in run.errors, run.errors.get(part, "")) if m]
        gathered = run.dp.gather(generated.judge.get(name, []))
        if failed:
            run.errors[part] = failed[0]
        elif run.dp.is_main:
            outs = [o for _, o in gathered]
            path = (judge.write_alpaca_eval(outs, run.opts.output_dir) if name == "alpaca_eval"
                    else judge.write_mt_bench(outs, run.opts.output_dir, run.model_id))
            run.new.setdefault("generations", {})[name] = {
                "file": os.path.relpath(path, run.opts.output_dir), "count": len(outs), "model_id": run.model_id,
                "max_new_tokens": run.opts.judge_max_new_tokens, "decoding": "greedy"}


def harness_tasks_phase(run: EvalRun) -> None:
    """3. The lm-eval benchmarks (``run.new["tasks"]``, ``run.new["lm_eval"]``); a task that failed is recorded
    under ``tasks/<task>``. Under several ranks only the HF backend runs them everywhere (it shards itself);
    another backend runs on one process."""
    import torch

    opts = run.opts
    if not opts.tasks:
        return
    t0 = time.time()
    run.new["attempted"] += [f"tasks/{t}" for t in opts.tasks]
    try:
        backend = harness.resolve_backend(opts.backend, run.device.type, run.dp.world)
        if run.dp.world == 1 or backend == "hf":
            out = harness.run_tasks(
                opts.model_dir, list(opts.tasks), preset=opts.preset, include_path=opts.include_path,
                manager=run.inputs["task_manager"],
                tokenizer=opts.tokenizer if opts.tokenizer and os.path.isdir(opts.tokenizer) else None,
                num_fewshot=opts.num_fewshot, limit=opts.limit,
                batch_size=opts.lm_eval_batch_size or ("auto" if run.device.type == "cuda" else 8),
                device=str(run.device), dtype=str(run.dtype).replace("torch.", ""), backend=backend,
                add_bos=starts_with_bos(run.formatter), task_metrics=opts.task_metrics,
                model_args=opts.lm_eval_model_args,
                device_count=torch.cuda.device_count() if run.device.type == "cuda" else 1)
            if out is not None:
                run.new["tasks"] = out["tasks"]
                run.new["lm_eval"] = out["config"]
                for t, r in out["tasks"].items():
                    if "error" in r:
                        run.errors[f"tasks/{t}"] = r["error"]
    except Exception as e:                  # noqa: BLE001
        msg = _error(e)
        for t in opts.tasks:
            run.errors[f"tasks/{t}"] = msg
    run.timing["tasks"] = round(time.time() - t0, 2)


def write_report(run: EvalRun) -> str:
    """Rank 0: the run's settings, timings and errors added, merged into ``<output>/eval_results.json``."""
    import torch
    import transformers

    import witscale
    from witscale.evaluation.results import write_results

    opts = run.opts
    run.new["settings"] = {
        "template": opts.template, "system": opts.system, "tokenizer": run.inputs.get("tokenizer_path"),
        "device": str(run.device), "dtype": str(run.dtype).replace("torch.", ""), "world_size": run.dp.world,
        "posix_file": os.path.abspath(opts.posix) if opts.posix else None, "posix_kinds": list(opts.posix_kinds),
        "posix_seed": opts.posix_seed, "limit": opts.limit,
        "versions": {"witscale": witscale.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "lm_eval": harness.available()}}
    run.new["timing_s"] = run.timing
    run.new["errors"] = run.errors
    return write_results(opts.output_dir, run.new)


def starts_with_bos(formatter) -> bool:
    """Make lm-eval prepend BOS when the template starts with it (``plain``: BOS, prompt …); otherwise lm-eval
    keeps the tokenizer's own default."""
    bos = formatter.tokenizer.bos_id
    return bos is not None and formatter.prefix("Hello")[:1] == [bos]
