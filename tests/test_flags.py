"""One declaration per flag: train.py's parser is generated from RunConfig's fields (witscale/training/flags.py).
The parser and the dataclass match one to one, choices are the code's own constants, and a value outside a
field's range is refused when the config is built, in one line naming the flag. No process group, no data."""
from __future__ import annotations

import argparse
import typing
from collections import Counter
from dataclasses import MISSING, dataclass, fields
from typing import Optional

import pytest

from tests.test_train_cli_operations import _cli    # in-process with capsys
from witscale.training.config import OBJECTIVES, PRESETS, RunConfig
from witscale.training.config_file import NOT_IN_FILES
from witscale.training.flags import UsageError, add_flags, at_least, check_values, option, positive

BASE = ["--ds_config", "x.json", "--data", "d", "--model-config", "c.json", "--output-dir", "o"]


def _options(parser):
    return [a for a in parser._actions if a.option_strings]


def test_every_run_config_field_has_exactly_one_flag_and_every_flag_one_field():
    from witscale.train import build_parser
    parser = build_parser()
    dests = Counter(a.dest for a in _options(parser))
    names = {f.name for f in fields(RunConfig)}
    assert set(dests) - NOT_IN_FILES == names             # the parser's own: --help, --config, --local_rank
    assert all(dests[name] == 1 for name in names), dests
    hints = typing.get_type_hints(RunConfig)
    for action in _options(parser):
        if action.dest not in names:
            continue
        f = next(f for f in fields(RunConfig) if f.name == action.dest)
        # the flag is the field's name, its default the field's, its type the annotation's
        assert "--" + f.name.replace("_", "-") in action.option_strings or "--" + f.name in action.option_strings
        assert action.required == (f.default is MISSING and f.name not in ("model", "model_config")), f.name
        if f.default is not MISSING:
            assert parser.get_default(f.name) == f.default, f.name
        kind = hints[f.name]
        kind = next((a for a in typing.get_args(kind) if a is not type(None)), kind) if typing.get_origin(
            kind) is typing.Union else kind
        if kind in (int, float):
            assert action.type is kind, f.name
        if kind is bool:
            assert isinstance(action, argparse._StoreTrueAction), f.name
    # every field's flag parses into a RunConfig (the namespace carries no other settings)
    args = build_parser().parse_args(BASE)
    assert set(vars(args)) - NOT_IN_FILES == names
    assert RunConfig.from_args(args).as_dict().keys() == names


def test_choices_are_the_codes_constants():
    from witscale.data.weighting import NORMALIZATIONS
    from witscale.model.hf_io import EXPORT_DTYPES
    from witscale.model.pipeline import PARTITION_METHODS
    from witscale.train import build_parser
    from witscale.training.objectives.dpo import DPO_LOSSES
    choices = {a.dest: a.choices for a in _options(build_parser())}
    assert choices["dpo_loss"] is DPO_LOSSES
    assert choices["normalization"] is NORMALIZATIONS
    assert choices["pp_partition"] is PARTITION_METHODS
    assert choices["objective"] is OBJECTIVES
    assert choices["export_dtype"] == tuple(EXPORT_DTYPES)
    assert choices["preset"] == tuple(sorted(PRESETS))
    # the preset's help says what it sets, from PRESETS itself
    text = " ".join(build_parser().format_help().split())
    assert "dpo-paper: --objective dpo --lr 5e-7 --weight-decay 0 --warmup-ratio 0.1 --epochs 2 --beta 0.1" in text


@pytest.mark.parametrize("flag,value,message", [
    ("--warmup-ratio", "1.5", "--warmup-ratio 1.5 is out of range (must be in [0, 1])"),
    ("--micro-batch-size", "0", "--micro-batch-size 0 is out of range (must be >= 1)"),
    ("--save-steps", "-1", "--save-steps -1 is out of range (must be >= 0)"),
    ("--dist-timeout", "inf", "--dist-timeout inf is out of range (must be a finite number > 0)"),
    ("--epochs", "0", "--epochs 0.0 is out of range (must be a finite number > 0)"),
    ("--pairs-per-step", "0", "--pairs-per-step 0 is out of range (must be >= 1)"),
    ("--attention", "nope", "--attention: unknown attention backend 'nope'"),
])
def test_a_value_out_of_range_is_refused_in_one_line_naming_the_flag(capsys, flag, value, message):
    code, err = _cli(BASE + [flag, value], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {message}"), err


def test_range_checks_run_whenever_a_config_is_built(tmp_path, capsys):
    with pytest.raises(UsageError, match=r"^--warmup-ratio 2 is out of range \(must be in \[0, 1\]\)$"):
        RunConfig(data="d", output_dir="o", ds_config="c", warmup_ratio=2)
    with pytest.raises(UsageError, match=r"^--grad-accum 0 is out of range"):
        RunConfig(data="d", output_dir="o", ds_config="c", grad_accum=0)
    ok = RunConfig(data="d", output_dir="o", ds_config="c", max_steps=None, peak_tflops=None)   # None: unset
    assert ok.grad_accum == 1 and ok.lr == 2e-5
    # a value from a config file too
    (tmp_path / "run.yaml").write_text("warmup_ratio: 2\n")
    code, err = _cli(BASE + ["--config", str(tmp_path / "run.yaml")], capsys)
    assert code == 2 and err == ["error: --warmup-ratio 2.0 is out of range (must be in [0, 1])"], err


def test_precompute_reference_takes_the_shared_flags_from_run_config():
    from tools.precompute_reference import SHARED_WITH_TRAIN, build_parser, plan
    from witscale.train import build_parser as train_parser
    ours = {a.dest: a for a in _options(build_parser())}
    train = {a.dest: a for a in _options(train_parser())}
    for name in SHARED_WITH_TRAIN:
        a, b = ours[name], train[name]
        assert (a.option_strings, a.type, a.default, a.choices, a.nargs) == \
               (b.option_strings, b.type, b.default, b.choices, b.nargs), name
    for flag, value, message in (("--micro-batch-size", "0", "--micro-batch-size 0 is out of range"),
                                 ("--dist-timeout", "0", "--dist-timeout 0.0 is out of range")):
        args = build_parser().parse_args(["--data", "d", "--model", "m", flag, value])
        with pytest.raises(UsageError, match=message):
            plan(args, world_size=1)


def test_add_flags_reads_the_declaration():
    @dataclass(frozen=True)
    class Toy:
        path: str = option(help="a required flag", group="g1")
        a: Optional[str] = option(None, "one of a/b", group="g1", one_of="ab", required=True)
        b: Optional[str] = option(None, "one of a/b", group="g1", one_of="ab", required=True)
        count: int = option(2, "at least 1", group="g2", check=at_least(1), names=("--count", "-n"))
        rate: Optional[float] = option(None, "positive", group="g2", check=positive)
        pair: tuple[float, float] = option((1.0, 2.0), group="g2")
        switch: bool = option(False, "a switch")
        undeclared: int = 0            # not a flag

    p = argparse.ArgumentParser()
    groups = add_flags(p, Toy, help={"rate": "overridden"})
    assert list(groups) == ["g1", "g2"]
    args = p.parse_args(["--path", "x", "--b", "y", "-n", "3", "--pair", "3", "4", "--switch"])
    assert vars(args) == {"path": "x", "a": None, "b": "y", "count": 3, "rate": None, "pair": [3.0, 4.0],
                          "switch": True}
    assert "--undeclared" not in p._option_string_actions
    assert p._option_string_actions["--rate"].help == "overridden"
    for bad in (["--b", "y"], ["--path", "x"], ["--path", "x", "--a", "1", "--b", "2"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)
    check_values(Toy, vars(args))
    with pytest.raises(UsageError, match=r"^--count 0 is out of range \(must be >= 1\)$"):
        check_values(Toy, dict(vars(args), count=0))
    with pytest.raises(UsageError, match="--rate nan is out of range"):
        check_values(Toy, dict(vars(args), rate=float("nan")))
    with pytest.raises(ValueError, match="declares no flag for undeclared"):
        add_flags(argparse.ArgumentParser(), Toy, ["count", "undeclared"])
