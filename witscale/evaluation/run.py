"""One evaluation of one exported model, as tools/evaluate.py runs it: check every input, generate (POSIX
responses, judge-benchmark answers) with the transformers model, score POSIX pairs with witscale's model,
run lm-eval, and merge everything into ``<output>/eval_results.json``.

Each part (``posix``, ``generations/<benchmark>``, ``tasks/<task>``) that fails is recorded under ``errors`` and
the others still run; ``evaluate`` returns the errors (the CLI exits 1 when there are any). Inputs are
checked before any model is loaded: a bad file or an unknown option costs a second, not a model load.
"""
from __future__ import annotations

import logging
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Optional, Sequence

from witscale.evaluation import harness, judge
from witscale.evaluation.parallel import DataParallel
from witscale.evaluation.variants import KINDS, PromptSet, read_prompt_sets

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


def evaluate(opts: EvalOptions, dp: Optional[DataParallel] = None) -> dict:
    """Run the evaluation; write eval_results.json on rank 0; returns {part: error} (empty: all fine)."""
    import torch

    from witscale.evaluation import models, posix
    from witscale.evaluation.results import write_results

    dp = dp or DataParallel()
    inputs = check_inputs(opts)
    device = models.pick_device(opts.device)
    dtype = models.pick_dtype(opts.dtype, device)
    show = opts.progress and dp.is_main
    errors: dict = {}
    timing: dict = {}
    new: dict = {"model": os.path.abspath(opts.model_dir), "attempted": []}
    model_id = opts.model_id or default_model_id(opts)

    sets: list[PromptSet] = inputs.get("sets", [])
    mine = dp.shard(len(sets))
    formatter = inputs.get("formatter")
    judged = [n for n in ("alpaca_eval", "mt_bench") if n in inputs]

    # ---- 1. generation: POSIX responses and judge-benchmark answers, with the transformers model
    responses, prefixes, judge_out = None, None, {}
    if sets or judged:
        t0 = time.time()
        try:
            generator = models.load_generator(opts.model_dir, device, dtype)
        except Exception as e:              # noqa: BLE001 - recorded, the benchmarks may still run
            msg = _error(e)
            for part in (["posix"] if sets else []) + [f"generations/{n}" for n in judged]:
                errors[part] = f"loading the model for generation: {msg}"
            generator = None
        if generator is not None and sets:
            try:
                my_sets = [sets[i] for i in mine]
                prefixes = posix.set_prefixes(my_sets, formatter)
                bar = _Progress(show, sum(len(p) for p in prefixes), "POSIX: generating")
                responses = posix.generate_responses(generator, prefixes, formatter, opts.max_new_tokens,
                                                     opts.batch_size, bar)
                bar.close()
            except Exception as e:          # noqa: BLE001
                errors["posix"] = _error(e)
        for name in judged:
            if generator is None:
                break
            try:
                records = inputs[name]
                idx = dp.shard(len(records))
                part = [records[i] for i in idx]
                turns = sum(len(r["turns"]) for r in part) if name == "mt_bench" else len(part)
                bar = _Progress(show, turns, f"{name}: generating")

                def generate(convs, _bar=bar):
                    from witscale.evaluation.prompting import decode, strip_stop
                    ids = models.greedy_generate(generator, [formatter.prefix(c) for c in convs], formatter.stop_ids,
                                                 formatter.tokenizer.pad_id, opts.judge_max_new_tokens,
                                                 opts.batch_size)
                    _bar(len(convs))
                    return [decode(formatter.tokenizer, strip_stop(y, formatter.stop_ids)) for y in ids]
                outs = (judge.alpaca_eval_outputs(part, generate, model_id) if name == "alpaca_eval"
                        else judge.mt_bench_answers(part, generate, model_id))
                judge_out[name] = list(zip(idx, outs))
                bar.close()
            except Exception as e:          # noqa: BLE001
                errors[f"generations/{name}"] = _error(e)
        if generator is not None:
            del generator
            models.free_memory()
        timing["generation"] = round(time.time() - t0, 2)

    # ---- 2. POSIX scoring with witscale's model, on packed rows
    if sets:
        new["attempted"].append("posix")
        t0 = time.time()
        set_out = []
        if "posix" not in errors:
            try:
                scorer = models.load_scorer(opts.model_dir, device, dtype, opts.attention)
                bar = _Progress(show, sum(len(p) ** 2 for p in prefixes), "POSIX: scoring")
                mats = posix.score_matrices(scorer, prefixes, responses, opts.max_tokens, bar)
                bar.close()
                del scorer
                models.free_memory()
                set_out = posix.set_results([sets[i] for i in mine], prefixes, responses, mats, formatter,
                                            opts.max_new_tokens)
            except Exception as e:          # noqa: BLE001
                errors["posix"] = _error(e)
        failed = [m for m in dp.all_ok("posix" not in errors, errors.get("posix", "")) if m]
        gathered = dp.gather(list(zip(mine, set_out)))
        if failed:
            errors["posix"] = failed[0]
        elif dp.is_main:
            new["posix"] = posix.summarize([r for _, r in gathered], template=opts.template,
                                           max_new_tokens=opts.max_new_tokens)
        timing["posix_scoring"] = round(time.time() - t0, 2)

    # ---- judge outputs, gathered and written on rank 0
    for name in judged:
        part = f"generations/{name}"
        new["attempted"].append(part)
        failed = [m for m in dp.all_ok(part not in errors, errors.get(part, "")) if m]
        gathered = dp.gather(judge_out.get(name, []))
        if failed:
            errors[part] = failed[0]
        elif dp.is_main:
            outs = [o for _, o in gathered]
            path = (judge.write_alpaca_eval(outs, opts.output_dir) if name == "alpaca_eval"
                    else judge.write_mt_bench(outs, opts.output_dir, model_id))
            new.setdefault("generations", {})[name] = {
                "file": os.path.relpath(path, opts.output_dir), "count": len(outs), "model_id": model_id,
                "max_new_tokens": opts.judge_max_new_tokens, "decoding": "greedy"}

    # ---- 3. benchmarks through lm-eval
    if opts.tasks:
        t0 = time.time()
        new["attempted"] += [f"tasks/{t}" for t in opts.tasks]
        try:
            backend = harness.resolve_backend(opts.backend, device.type, dp.world)
            run_here = dp.world == 1 or backend == "hf"
            out = None
            if run_here:
                out = harness.run_tasks(
                    opts.model_dir, list(opts.tasks), preset=opts.preset, include_path=opts.include_path,
                    manager=inputs["task_manager"],
                    tokenizer=opts.tokenizer if opts.tokenizer and os.path.isdir(opts.tokenizer) else None,
                    num_fewshot=opts.num_fewshot, limit=opts.limit,
                    batch_size=opts.lm_eval_batch_size or ("auto" if device.type == "cuda" else 8),
                    device=str(device), dtype=str(dtype).replace("torch.", ""), backend=backend,
                    add_bos=starts_with_bos(formatter), task_metrics=opts.task_metrics,
                    model_args=opts.lm_eval_model_args,
                    device_count=torch.cuda.device_count() if device.type == "cuda" else 1)
            if out is not None:
                new["tasks"] = out["tasks"]
                new["lm_eval"] = out["config"]
                for t, r in out["tasks"].items():
                    if "error" in r:
                        errors[f"tasks/{t}"] = r["error"]
        except Exception as e:              # noqa: BLE001
            msg = _error(e)
            for t in opts.tasks:
                errors[f"tasks/{t}"] = msg
        timing["tasks"] = round(time.time() - t0, 2)

    if dp.is_main:
        import transformers

        import witscale
        new["settings"] = {
            "template": opts.template, "system": opts.system, "tokenizer": inputs.get("tokenizer_path"),
            "device": str(device), "dtype": str(dtype).replace("torch.", ""), "world_size": dp.world,
            "posix_file": os.path.abspath(opts.posix) if opts.posix else None, "posix_kinds": list(opts.posix_kinds),
            "posix_seed": opts.posix_seed, "limit": opts.limit,
            "versions": {"witscale": witscale.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__, "lm_eval": harness.available()}}
        new["timing_s"] = timing
        new["errors"] = errors
        write_results(opts.output_dir, new)
    return errors


def starts_with_bos(formatter) -> bool:
    """Make lm-eval prepend BOS when the template starts with it (``plain``: BOS, prompt …); otherwise lm-eval
    keeps the tokenizer's own default."""
    bos = formatter.tokenizer.bos_id
    return bos is not None and formatter.prefix("Hello")[:1] == [bos]
