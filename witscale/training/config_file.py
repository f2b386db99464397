"""``train.py --config FILE``: a run's settings from a YAML or JSON file.

The file holds flag values under the flags' names (``max_steps`` or ``max-steps``); a run's own
``effective_config.json`` is accepted back (its ``args`` object is read, the rest — the filled DeepSpeed
config, the weight table, the layout — is what the run derived). The values become the parser's defaults,
so precedence is: a flag given on the command line > the config file > ``--preset`` > the built-in default.

Every key is checked against the parser before anything runs: an unknown key, a value of the wrong type or
outside a flag's choices is refused in one line that names the file and the key (and the nearest flag).
Relative paths in the file are read from the current directory, as on the command line.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
from typing import Any

# Flags that a config file cannot set: argparse's own, the launcher's, and --config itself.
NOT_IN_FILES = {"help", "local_rank", "config"}
# The keys of effective_config.json besides "args" (written by train.py's _announce; derived, not settings).
EFFECTIVE_CONFIG_KEYS = {"args", "ds_config", "weight_table", "total_steps", "layout", "rendezvous", "config_file"}


class ConfigFileError(ValueError):
    """A config file that cannot be used; one line naming the file and what is wrong."""


def read_config_file(path: str) -> dict:
    """The file's mapping of settings (YAML, or JSON by a .json suffix)."""
    if not os.path.isfile(path):
        raise ConfigFileError(f"--config {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigFileError(f"--config {path}: cannot read it ({e})") from None
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigFileError(f"--config {path}:line {e.lineno}: not valid JSON ({e.msg})") from None
    else:
        import yaml
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":line {mark.line + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigFileError(f"--config {path}{where}: not valid YAML ({problem})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"--config {path}: expected a mapping of flag names to values, "
                              f"found a {type(data).__name__}")
    if isinstance(data.get("args"), dict) and set(data) <= EFFECTIVE_CONFIG_KEYS:
        data = data["args"]            # a run's effective_config.json
    return data


def config_file_record(path: str) -> dict:
    """What effective_config.json says of the --config file a run read: its absolute path and the sha256 of
    its bytes (the file may be edited after the run; the digest tells whether it still is the one)."""
    import hashlib
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return {"path": os.path.abspath(path), "sha256": digest}


def _flag(action: argparse.Action) -> str:
    longs = [s for s in action.option_strings if s.startswith("--")]
    return (longs or action.option_strings)[0]


def _convert(path: str, key: str, action: argparse.Action, value: Any) -> Any:
    """The value as argparse would have produced it from the command line; refused when it cannot be."""
    flag = _flag(action)

    def bad(why: str):
        return ConfigFileError(f"--config {path}: {key}: {why} (the value of {flag})")

    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise bad(f"expected true or false, found {value!r}")
        return value
    if value is None:
        return None
    kind = action.type

    def one(v):
        if isinstance(v, (dict, list)):
            raise bad(f"expected a single value, found {v!r}")
        if kind is int:
            if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, str) and v.strip().lstrip("-").isdigit())):
                raise bad(f"expected an integer, found {v!r}")
            return int(v)
        if kind is float:
            if isinstance(v, bool):
                raise bad(f"expected a number, found {v!r}")
            try:
                return float(v)
            except ValueError:
                raise bad(f"expected a number, found {v!r}") from None
        if kind is None and not isinstance(v, str):
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return str(v)
            raise bad(f"expected a string, found {v!r}")
        return kind(v) if kind is not None else v

    if isinstance(action.nargs, int) and action.nargs > 1:
        if not isinstance(value, (list, tuple)) or len(value) != action.nargs:
            raise bad(f"expected a list of {action.nargs} values, found {value!r}")
        converted = [one(v) for v in value]
    else:
        converted = one(value)
    if action.choices is not None and converted not in action.choices:
        raise bad(f"{converted!r} is not one of {', '.join(map(str, action.choices))}")
    return converted


def settings_from_file(path: str, parser: argparse.ArgumentParser) -> dict:
    """The file's settings as {dest: value}, each checked against ``parser``'s flags."""
    data = read_config_file(path)
    actions = {a.dest: a for a in parser._actions if a.dest not in NOT_IN_FILES and a.option_strings}
    values = {}
    for raw_key, value in data.items():
        key = str(raw_key).lstrip("-").replace("-", "_")
        if key not in actions:
            near = difflib.get_close_matches(key, list(actions), n=1, cutoff=0.5)
            hint = f" (did you mean {_flag(actions[near[0]])}?)" if near else ""
            raise ConfigFileError(f"--config {path}: unknown key '{raw_key}'{hint}")
        values[key] = _convert(path, str(raw_key), actions[key], value)
    return values


def apply_config_file(parser: argparse.ArgumentParser, path: str, settings: dict) -> None:
    """Make ``settings`` the parser's defaults. A required flag (or required one-of group) that the file sets
    is no longer required on the command line; flags given there still win."""
    parser.set_defaults(**settings)
    for action in parser._actions:
        if action.required and settings.get(action.dest) is not None:
            action.required = False
    for group in parser._mutually_exclusive_groups:
        if group.required and any(settings.get(a.dest) is not None for a in group._group_actions):
            given = [a for a in group._group_actions if settings.get(a.dest) is not None]
            if len(given) > 1:
                raise ConfigFileError(f"--config {path}: {' and '.join(_flag(a).lstrip('-') for a in given)} "
                                      "cannot both be set")
            group.required = False
