"""One declaration per flag: a dataclass field with its flag's metadata, from which the parser is generated.

    lr: Optional[float] = option(None, "peak learning rate", group=OPTIMIZATION, check=positive)

declares the field ``lr``, the flag ``--lr`` (type float: the annotation's, default None: the field's), its
``--help`` line and group, and its range check, which runs whenever the dataclass is built (``check_values``
from ``__post_init__``) and refuses a bad value in one line naming the flag. ``add_flags`` turns the fields
into argparse arguments, so a field and its flag cannot drift apart; other entry points that take the same
setting (tools/precompute_reference.py …) add the same declaration with ``add_flags(parser, cls, names)``.

What the metadata may say (``option``'s keywords):
- ``help``, ``group`` (an argument group's title), ``metavar``;
- ``choices``: take them from the constant that the code checks against (``DPO_LOSSES``), never a copy;
- ``check``: a ``Check`` (``at_least(1)``, ``positive``, ``non_negative``, ``fraction``) or a function that
  raises ValueError with a one-line reason; ``None`` (an unset optional setting) is never checked;
- ``names``: the flag's spellings when not just ``--field-name`` (the first is the one messages use);
- ``one_of``: fields sharing a name are mutually exclusive (``required=True`` on them: one must be given);
- ``nargs``/``const``: as argparse's (``tuple[float, float]`` gives nargs=2 by itself).
The type comes from the annotation: ``bool`` is a switch (store_true), ``Optional[X]`` is X, ``str`` is kept
as given. Checks that need several fields or files (the weight table, the data, the layout) stay where those
are read (witscale/train.py ``plan_run``); an objective's own checks stay with the objective.
"""
from __future__ import annotations

import argparse
import math
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable, Optional

FLAG = "flag"          # the metadata key of a field's FlagSpec


class UsageError(ValueError):
    """A flag or input file that cannot work; reported as one line before anything starts."""


@dataclass(frozen=True)
class Check:
    """A range: ``ok(value)`` or the flag is refused with '--flag VALUE is out of range (rule)'."""
    rule: str
    ok: Callable[[Any], bool]

    def problem(self, flag: str, value) -> Optional[str]:
        return None if self.ok(value) else f"{flag} {value} is out of range ({self.rule})"


def at_least(low: int) -> Check:
    return Check(f"must be >= {low}", lambda v: v >= low)


positive = Check("must be a finite number > 0", lambda v: math.isfinite(v) and v > 0)
non_negative = Check("must be >= 0", lambda v: v >= 0)                 # NaN fails it too
fraction = Check("must be in [0, 1]", lambda v: 0 <= v <= 1)


@dataclass(frozen=True)
class FlagSpec:
    help: Optional[str] = None
    group: Optional[str] = None
    check: Any = None                  # a Check, or a function raising ValueError
    choices: Optional[tuple] = None
    names: tuple = ()
    metavar: Optional[str] = None
    one_of: Optional[str] = None
    required: bool = False
    nargs: Any = None
    const: Any = None

    def problem(self, flag: str, value) -> Optional[str]:
        if self.check is None or value is None:
            return None
        if isinstance(self.check, Check):
            return self.check.problem(flag, value)
        try:
            self.check(value)
        except ValueError as e:
            return f"{flag}: {e}"
        return None


def option(default=MISSING, help: Optional[str] = None, **spec):
    """A dataclass field that is also a flag (``FlagSpec``'s keywords); no default: the flag is required
    (unless ``one_of`` groups it)."""
    return field(default=default, metadata={FLAG: FlagSpec(help=help, **spec)})


def spec_of(f) -> FlagSpec:
    return f.metadata.get(FLAG) or FlagSpec()


def flag_names(f) -> tuple:
    return spec_of(f).names or ("--" + f.name.replace("_", "-"),)


def flag_name(f) -> str:
    """The spelling that messages use."""
    return flag_names(f)[0]


def _plain_type(annotation):
    """Optional[X] → X."""
    if typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def argparse_kwargs(f, hint) -> dict:
    """add_argument's keywords for field ``f`` of annotation ``hint``."""
    spec, kind = spec_of(f), _plain_type(hint)
    kw = {"dest": f.name, "help": spec.help}
    if kind is bool:
        kw.update(action="store_true", default=bool(f.default) if f.default is not MISSING else False)
        return kw
    if typing.get_origin(kind) is tuple:
        items = typing.get_args(kind)
        kw.update(nargs=len(items), type=items[0])
    elif kind in (int, float):
        kw["type"] = kind
    for key in ("choices", "metavar", "nargs", "const"):
        if getattr(spec, key) is not None:
            kw[key] = getattr(spec, key)
    if f.default is MISSING:
        kw["required"] = spec.one_of is None
    else:
        kw["default"] = f.default
    return kw


def add_flags(parser: argparse.ArgumentParser, cls, names=None, groups=(), help: Optional[dict] = None,
              grouped: bool = True) -> dict:
    """Add the flags of dataclass ``cls``'s fields (all, or those in ``names``) to ``parser``, in argument
    groups titled by their ``group`` (created in the order of ``groups``, then of first use; ``grouped=False``:
    none, for a tool that borrows a few flags); ``help`` replaces a field's help text where another tool gives
    it another meaning. Returns {title: group}."""
    hints = typing.get_type_hints(cls)
    chosen = [f for f in fields(cls) if FLAG in f.metadata and (names is None or f.name in names)]
    if names is not None and len(chosen) != len(set(names)):
        unknown = set(names) - {f.name for f in chosen}
        raise ValueError(f"add_flags: {cls.__name__} declares no flag for {', '.join(sorted(unknown))}")
    made = {}
    for title in list(groups) + [spec_of(f).group for f in chosen]:
        if grouped and title is not None and title not in made:
            made[title] = parser.add_argument_group(title)
    exclusive = {}
    for f in chosen:
        spec = spec_of(f)
        target = made.get(spec.group, parser)
        if spec.one_of is not None:
            if spec.one_of not in exclusive:
                exclusive[spec.one_of] = target.add_mutually_exclusive_group(required=spec.required)
            target = exclusive[spec.one_of]
        kw = argparse_kwargs(f, hints[f.name])
        if help and f.name in help:
            kw["help"] = help[f.name]
        target.add_argument(*flag_names(f), **kw)
    return made


def check_values(cls, values: dict, names=None) -> None:
    """UsageError (one line naming the flag) for the first value outside its field's check; ``values`` maps
    field names to values (a dataclass's own, or a namespace's ``vars``)."""
    for f in fields(cls):
        if FLAG in f.metadata and f.name in values and (names is None or f.name in names):
            problem = spec_of(f).problem(flag_name(f), values[f.name])
            if problem:
                raise UsageError(problem)
