"""Command-line checks found by following the README as a user (no process group: validation only).

- a requested --attention that cannot soft-cap a Gemma-2 model is one line before anything starts, in
  witscale/train.py and tools/precompute_reference.py (it used to be a traceback at the first forward);
- the reference/class-weight refusal prints float32 weights as given (0.1, not 0.10000000149011612);
- the epoch summary says how many rows of each epoch are skipped (they do not fill a global batch);
- the export log does not call generation_config.json a tokenizer file.
"""
from __future__ import annotations

import json

import pytest

from tests import test_train_cli_operations as operations

_args = operations._args
run_inputs = operations.run_inputs      # the session fixture: packed data, a tiny Llama config, the tokenizer


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory, run_inputs):
    """A Gemma-2 config.json with attention soft-capping, matching the test tokenizer (no weights needed:
    validation reads only the config)."""
    llama = json.load(open(run_inputs["config"]))
    root = tmp_path_factory.mktemp("gemma2")
    config = {"model_type": "gemma2", "vocab_size": llama["vocab_size"], "hidden_size": 32,
              "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 8, "query_pre_attn_scalar": 8, "max_position_embeddings": 256, "sliding_window": 16,
              "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
              "bos_token_id": llama["bos_token_id"], "eos_token_id": llama["eos_token_id"]}
    (root / "config.json").write_text(json.dumps(config))
    return str(root)


def test_train_refuses_a_backend_that_cannot_soft_cap_up_front(run_inputs, gemma2_dir, tmp_path):
    from witscale.train import UsageError, build_parser, plan_run
    from witscale.training.config import RunConfig
    args = dict(zip(*[iter(_args(run_inputs, tmp_path, 2))] * 2))
    args.update({"--model-config": f"{gemma2_dir}/config.json", "--attention": "sdpa_grouped"})

    def planned():
        return plan_run(RunConfig.from_args(build_parser().parse_args([x for kv in args.items() for x in kv])), 1)

    with pytest.raises(UsageError) as e:
        planned()
    assert str(e.value).startswith("--attention sdpa_grouped with ") and "\n" not in str(e.value), e.value
    assert "cannot apply the model's attention soft-capping (attn_logit_softcapping 50)" in str(e.value), e.value
    args["--attention"] = "eager"           # a capping backend passes validation
    assert planned().config.attention == "eager"


@pytest.mark.parametrize("backend,message", [
    ("sdpa_segments", "cannot apply the model's attention soft-capping"),
    ("nope", "unknown attention backend 'nope'"),
])
def test_precompute_reference_checks_the_backend_up_front(run_inputs, gemma2_dir, tmp_path, backend, message):
    from tools.precompute_reference import UsageError, build_parser, plan
    from witscale.data.synthetic import make_preference_dataset
    data = str(tmp_path / "pref")
    make_preference_dataset(data, run_inputs["tokenizer"], n=6, seq_len=160)
    args = build_parser().parse_args(["--data", data, "--model", gemma2_dir, "--attention", backend])
    with pytest.raises(UsageError, match=message):
        plan(args, world_size=1)
    args.attention = "auto"
    assert plan(args, world_size=1)[1].attn_logit_softcapping == 50.0


def test_weight_table_refusal_prints_the_weights_as_given():
    from witscale.data.weighting import build_weight_table
    from witscale.training.objectives.dpo import check_reference, weight_table_record
    manifest = {"task": "preference", "reference": {"weight_table": weight_table_record(build_weight_table(0, 1))}}
    with pytest.raises(ValueError) as e:
        check_reference(manifest, "packed/uf", build_weight_table(0.1, 1.0), None)
    assert "this run's are [0, 0.1, 0.1, 0.1, 1, 1, 1, 1, 0.1]" in str(e.value), e.value
    assert "summed under class weights [0, 0, 0, 0, 1, 1, 1, 1, 0]" in str(e.value), e.value


def test_epoch_summary_says_how_many_rows_are_skipped(run_inputs, tmp_path):
    from witscale.train import build_parser, epoch_summary, plan_run
    from witscale.training.config import RunConfig

    def summary(micro, accum):
        args = dict(zip(*[iter(_args(run_inputs, tmp_path, 2))] * 2))
        args.update({"--micro-batch-size": str(micro), "--grad-accum": str(accum)})
        args.pop("--max-steps")
        plan = plan_run(RunConfig.from_args(build_parser().parse_args([x for kv in args.items() for x in kv])), 1)
        return len(plan.dataset), plan.steps_per_epoch, epoch_summary(plan)

    rows, steps, text = summary(1, 1)
    assert steps == rows and "skipped" not in text, text
    rows, steps, text = summary(1, rows - 1)            # one step per epoch, one row left over
    assert steps == 1 and f"1 rows of each epoch skipped: they do not fill a global batch of {rows - 1}" in text


def test_export_log_does_not_call_generation_config_a_tokenizer(tmp_path, caplog):
    """A model directory with generation_config.json and no tokenizer (a model saved by transformers without
    one): the export log said 'tokenizer files: generation_config.json'."""
    import logging

    import torch
    from witscale.model import ModelConfig
    from witscale.training.export import write_hf_dir
    cfg = ModelConfig.from_dict({"model_type": "llama", "vocab_size": 8, "hidden_size": 4, "intermediate_size": 8,
                                 "num_hidden_layers": 1, "num_attention_heads": 1, "max_position_embeddings": 8,
                                 "tie_word_embeddings": True})
    state = {"model.embed_tokens.weight": torch.zeros(8, 4), "model.norm.weight": torch.ones(4),
             "model.layers.0.input_layernorm.weight": torch.ones(4),
             "model.layers.0.post_attention_layernorm.weight": torch.ones(4),
             **{f"model.layers.0.self_attn.{p}_proj.weight": torch.zeros(4, 4) for p in "qkvo"},
             "model.layers.0.mlp.gate_proj.weight": torch.zeros(8, 4),
             "model.layers.0.mlp.up_proj.weight": torch.zeros(8, 4),
             "model.layers.0.mlp.down_proj.weight": torch.zeros(4, 8)}
    src = tmp_path / "model"
    src.mkdir()
    (src / "generation_config.json").write_text("{}")
    with caplog.at_level(logging.INFO, logger="witscale"):
        write_hf_dir(state, cfg, str(tmp_path / "out"), str(src))
    line = [r.getMessage() for r in caplog.records if "exported HF model" in r.getMessage()][-1]
    assert f"tokenizer files: none in {src} (give --tokenizer), generation_config.json)" in line, line
    assert (tmp_path / "out" / "generation_config.json").exists()


def test_a_refused_model_config_names_its_file_once(run_inputs, gemma2_dir, tmp_path):
    """ModelConfig.from_json_file already names the file; train.py printed it twice ('F: F: …')."""
    from witscale.train import UsageError, build_parser, plan_run
    from witscale.training.config import RunConfig
    config = json.load(open(f"{gemma2_dir}/config.json"))
    config.update(model_type="gemma3_text")        # Gemma-3 with an attention soft-cap: refused
    path = str(tmp_path / "gemma3_capped.json")
    with open(path, "w") as f:
        json.dump(config, f)
    args = dict(zip(*[iter(_args(run_inputs, tmp_path, 2))] * 2))
    args["--model-config"] = path
    with pytest.raises(UsageError) as e:
        plan_run(RunConfig.from_args(build_parser().parse_args([x for kv in args.items() for x in kv])), 1)
    assert str(e.value).count(path) == 1 and "attn_logit_softcapping" in str(e.value), e.value


def test_precompute_reference_warns_when_it_replaces_another_models_log_probs():
    from tools.precompute_reference import replacement_notice
    stored = {"reference": {"model": "/runs/sft-a/hf", "fingerprint": "a" * 64}}
    assert replacement_notice({}, "b" * 64) is None                    # none yet
    assert replacement_notice(stored, "a" * 64) is None                # the same model again (a requeue)
    notice = replacement_notice(stored, "b" * 64)
    assert notice.startswith("replacing the reference log-probs of /runs/sft-a/hf (fingerprint aaaaaaaaaaaa)")


def test_dpo_only_flags_are_refused_for_sft_and_the_learning_rate_follows_the_objective(run_inputs, tmp_path):
    """--beta/--dpo-loss/--label-smoothing/--reference-model on an SFT run were silently ignored, and
    --objective dpo without the preset kept SFT's 2e-5 (40× the paper's DPO rate)."""
    from witscale.train import UsageError, build_parser, plan_run
    from witscale.training.config import RunConfig
    base = dict(zip(*[iter(_args(run_inputs, tmp_path, 2))] * 2))

    def planned(**extra):
        args = dict(base, **extra)
        return plan_run(RunConfig.from_args(build_parser().parse_args([x for kv in args.items() for x in kv])), 1)

    base.pop("--lr", None)            # _args sets one
    assert planned().config.lr == 2e-5 and planned().config.beta is None
    for flag, value in (("--beta", "0.2"), ("--dpo-loss", "ipo"), ("--label-smoothing", "0.1"),
                        ("--reference-model", str(tmp_path))):
        with pytest.raises(UsageError) as e:
            planned(**{flag: value})
        assert str(e.value) == f"{flag} apply to --objective dpo only", e.value
    cfg = RunConfig(data="d", output_dir="o", ds_config="c", objective="dpo")
    assert (cfg.lr, cfg.beta, cfg.dpo_loss, cfg.label_smoothing) == (5e-7, 0.1, "sigmoid", 0.0)
    explicit = RunConfig(data="d", output_dir="o", ds_config="c", objective="dpo", lr=1e-6, beta=0.3)
    assert (explicit.lr, explicit.beta) == (1e-6, 0.3)


def test_dpo_reference_must_come_from_the_starting_model_unless_another_is_named(tmp_path):
    """Without --reference-model the data's reference log-probs are checked against --model (DPO's usual
    start: the SFT model is the reference); they were not checked at all."""
    from safetensors.torch import save_file
    import torch
    from witscale.data.weighting import build_weight_table
    from witscale.training.objectives.dpo import check_reference, reference_fingerprint, weight_table_record

    def model(name, value):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text('{"model_type": "llama"}')
        save_file({"w": torch.full((64, 64), value)}, str(d / "model.safetensors"))
        return str(d)
    sft, other = model("sft", 1.0), model("other", 2.0)
    table = build_weight_table(0, 1)
    manifest = {"task": "preference", "reference": {"weight_table": weight_table_record(table), "model": sft,
                                                    "fingerprint": reference_fingerprint(sft)}}
    check_reference(manifest, "packed/uf", table, None, policy_model=sft)
    with pytest.raises(ValueError) as e:
        check_reference(manifest, "packed/uf", table, None, policy_model=other)
    assert f"not --model {other}" in str(e.value) and "pass --reference-model DIR" in str(e.value), e.value
    check_reference(manifest, "packed/uf", table, sft, policy_model=other)     # a named reference wins
    with pytest.raises(ValueError, match="not --reference-model"):
        check_reference(manifest, "packed/uf", table, other, policy_model=sft)
