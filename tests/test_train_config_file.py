"""train.py --config FILE: settings from YAML/JSON, flags beside it win, effective_config.json reads back,
unknown keys refused in one line naming the nearest flag. Real single-process CPU runs (ZeRO-0, gloo)."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from tests.train_helpers import tiny_llama_config

SEQ = 96


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, sp_model_path):
    from witscale.data.pack import PackOptions, pack_records
    from witscale.data.synthetic import generate_instruction_records
    from witscale.data.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("cfgfile")
    pack_records(generate_instruction_records(40, seed=3), sp_model_path, str(root / "train"),
                 PackOptions(seq_len=SEQ, template="plain"))
    tok = load_tokenizer(sp_model_path)
    model = tiny_llama_config(tok, SEQ)
    (root / "model.json").write_text(json.dumps(model))
    return {"train": str(root / "train"), "model": str(root / "model.json")}


def _settings(inputs):
    return {"data": inputs["train"], "model_config": inputs["model"], "ds_config": "ds_configs/zero0.json",
            "prompt_weight": 0.3, "micro_batch_size": 2, "grad_accum": 2, "lr": 3e-3, "warmup_ratio": 0.25,
            "max_steps": 4, "seed": 5, "adam_betas": [0.9, 0.95], "no_tensorboard": True}


def _flags(settings):
    out = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-") if key != "ds_config" else "--ds_config"
        if value is True:
            out.append(flag)
        elif isinstance(value, list):
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return out


def _train(args):
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore")
    res = subprocess.run([sys.executable, "witscale/train.py", *args], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def _losses(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [(r["step"], r["loss"], r["lr"]) for r in rows if "loss" in r]


@pytest.mark.slow  # trains through witscale/train.py in a subprocess, twice
def test_config_file_and_flags_train_alike_and_effective_config_reads_back(inputs, tmp_path):
    settings = _settings(inputs)
    _train(_flags(settings) + ["--output-dir", str(tmp_path / "flags")])
    import yaml
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({k.replace("_", "-") if k == "max_steps" else k: v
                                                       for k, v in settings.items()}))
    _train(["--config", str(tmp_path / "run.yaml"), "--output-dir", str(tmp_path / "yaml")])
    _train(["--config", str(tmp_path / "yaml" / "effective_config.json"), "--output-dir", str(tmp_path / "back")])
    ref = _losses(tmp_path / "flags")
    assert len(ref) == 4
    assert _losses(tmp_path / "yaml") == ref          # bit-identical per-step losses and learning rates
    assert _losses(tmp_path / "back") == ref
    args = json.load(open(tmp_path / "back" / "effective_config.json"))["args"]
    assert args["adam_betas"] == [0.9, 0.95] and args["prompt_weight"] == 0.3


def test_a_flag_beside_the_config_wins(inputs, tmp_path):
    from witscale.train import build_parser
    path = tmp_path / "run.json"
    path.write_text(json.dumps({**_settings(inputs), "output_dir": "o"}))
    args = build_parser().parse_args(["--lr", "1e-4", "--config", str(path), "--epochs", "2", "--model", "m"])
    assert args.lr == 1e-4 and args.prompt_weight == 0.3
    # a flag of a one-of group replaces the file's member: --epochs over max_steps, --model over model_config
    assert args.epochs == 2.0 and args.max_steps is None
    assert args.model == "m" and args.model_config is None
    # the config file beats a preset's default, a flag beats both
    path.write_text(json.dumps({"preset": "dpo-paper", "weight_decay": 0.05, "data": "d", "output_dir": "o",
                                "ds_config": "z", "model": "m"}))
    args = build_parser().parse_args(["--config", str(path), "--beta", "0.2"])
    assert (args.objective, args.lr, args.weight_decay, args.beta) == ("dpo", 5e-7, 0.05, 0.2)


@pytest.mark.parametrize("text,suffix,message", [
    ("max_step: 4\n", ".yaml", "unknown key 'max_step' (did you mean --max-steps?)"),
    ('{"prompt_wieght": 0.2}', ".json", "unknown key 'prompt_wieght' (did you mean --prompt-weight?)"),
    ("lr: fast\n", ".yaml", "lr: expected a number, found 'fast' (the value of --lr)"),
    ("normalization: mean\n", ".yaml", "normalization: 'mean' is not one of"),
    ("lr: [1\n", ".yaml", ":line 2: not valid YAML"),
    ("- 1\n", ".yaml", "expected a mapping of flag names to values"),
])
def test_a_bad_config_file_is_refused_in_one_line(tmp_path, capsys, text, suffix, message):
    from witscale.train import main
    path = tmp_path / ("run" + suffix)
    path.write_text(text)
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --config {path}") and message in err[0], err


def test_shipped_configs_parse(tmp_path):
    from witscale.train import build_parser
    from witscale.training.config import RunConfig
    folder = os.path.join(REPO_ROOT, "configs")
    names = sorted(n for n in os.listdir(folder) if n.endswith(".yaml"))
    assert {"tiny-cpu.yaml", "llama2-7b-alpaca.yaml", "llama2-70b-alpaca.yaml", "dpo-7b.yaml"} <= set(names)
    for name in names:
        args = build_parser().parse_args(["--config", os.path.join(folder, name), "--data", "d", "--output-dir", "o"])
        RunConfig.from_args(args)


@pytest.mark.slow  # trains through witscale/train.py in a subprocess, twice
def test_effective_config_records_the_config_files_path_and_digest_and_still_reads_back(inputs, tmp_path):
    import hashlib
    import yaml
    settings = {**_settings(inputs), "max_steps": 2}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(settings))
    _train(["--config", str(tmp_path / "run.yaml"), "--output-dir", str(tmp_path / "yaml")])
    effective = tmp_path / "yaml" / "effective_config.json"
    record = json.loads(effective.read_text())["config_file"]
    assert record == {"path": str(tmp_path / "run.yaml"),
                      "sha256": hashlib.sha256((tmp_path / "run.yaml").read_bytes()).hexdigest()}

    _train(["--config", str(effective), "--output-dir", str(tmp_path / "back")])      # the record reads back
    again = json.loads((tmp_path / "back" / "effective_config.json").read_text())["config_file"]
    assert again == {"path": str(effective), "sha256": hashlib.sha256(effective.read_bytes()).hexdigest()}
    assert _losses(tmp_path / "back") == _losses(tmp_path / "yaml")
