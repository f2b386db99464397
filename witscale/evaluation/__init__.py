"""Evaluation of exported models, as the WIT paper evaluates its (λp, λr) grid (tools/evaluate.py):

  variants    POSIX prompt sets: read, or generated (spelling errors, template changes) deterministically
  prompting   prompts rendered with the packer's templates, cut where the response begins
  models      the transformers model (greedy generation) and witscale's CausalLM (scoring), device/dtype
  scoring     teacher-forced log-probabilities of many (prefix, continuation) pairs packed per forward
  posix       the prompt-sensitivity index (paper's definition; the reference's normalization beside it)
  harness     lm-evaluation-harness benchmarks (optional extra: witscale[eval]); local_task: local tasks
  judge       generations for AlpacaEval and MT-Bench in the files their judges read
  parallel    data parallelism over the node's GPUs (torchrun)
  results     eval_results.json (merged per model)
  run         one evaluation of one model in phases: generation, POSIX scoring, judge files, lm-eval tasks, report
  sweep       the cells of a sweep and all their metrics (tools/collect_sweep.py)

Imports witscale.data and witscale.model only (never witscale.training).
"""
