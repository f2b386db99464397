"""The training objectives, registered by name (docs/objective.md#adding-an-objective).

    register(cls)          add an ``Objective`` subclass under ``cls.name`` (a decorator); its module is
                           imported below (built-in) or by whoever registers it (a test, a plug-in)
    get_objective(name)    the class (ValueError naming the known ones when there is none)
    find_objective(name)   the class, or None
    objective_for(cfg)     the class of ``cfg.objective`` built with the run's settings
    OBJECTIVES             the registered names, in registration order (--objective's choices; kept live)
    default_objective()    an instance of DEFAULT_OBJECTIVE ('sft') with its default settings

Built-in: ``sft`` (the weighted token loss, objectives/sft.py), ``dpo`` (objectives/dpo.py) and the
reference-free ``simpo`` and ``orpo`` (objectives/simpo.py, orpo.py; shared: objectives/length_normalized.py). Pair
objectives share objectives/pairs.py; reference log-probs are objectives/reference.py.
"""
from __future__ import annotations

from witscale.training.objectives.base import HeadStats, Objective

_REGISTRY: dict[str, type] = {}
OBJECTIVES: list[str] = []          # a list, not a tuple: argparse reads it at parse time
DEFAULT_OBJECTIVE = "sft"           # --objective's default


def register(cls: type) -> type:
    """Register an Objective subclass under ``cls.name`` (re-registering a name replaces it)."""
    if not (isinstance(cls, type) and issubclass(cls, Objective) and cls.name):
        raise TypeError(f"{cls!r}: an Objective subclass with a name is needed")
    if cls.name not in _REGISTRY:
        OBJECTIVES.append(cls.name)
    _REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove ``name`` (tests that register a toy objective)."""
    _REGISTRY.pop(name, None)
    if name in OBJECTIVES:
        OBJECTIVES.remove(name)


def find_objective(name: str):
    return _REGISTRY.get(name)


def get_objective(name: str):
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"--objective {name}: unknown (known: {', '.join(OBJECTIVES)})")
    return cls


def default_objective() -> Objective:
    """The default objective with its default settings (a Trainer built without one)."""
    return get_objective(DEFAULT_OBJECTIVE)()


def objective_for(cfg) -> Objective:
    """The run's objective (``cfg.objective`` with its settings from the RunConfig)."""
    return get_objective(cfg.objective).from_config(cfg)


def registered() -> list:
    """The registered classes, in registration order."""
    return [_REGISTRY[n] for n in OBJECTIVES]


def foreign_flags(cfg) -> list[tuple[str, list[str]]]:
    """The flags given in ``cfg`` that belong to other objectives than ``cfg.objective``: [(flag, owners)]. Each
    is refused rather than ignored (the user meant something)."""
    mine = get_objective(cfg.objective).flags
    out: dict[str, list[str]] = {}
    for cls in registered():
        for field, flag in cls.flags.items():
            if field not in mine and getattr(cfg, field, None) is not None:
                out.setdefault(flag, []).append(cls.name)
    return list(out.items())


def metric_tags() -> dict:
    """Every registered objective's metrics.jsonl key → TensorBoard tag (metrics.py)."""
    tags: dict = {}
    for cls in registered():
        tags.update(cls.metric_tags)
    return tags


def sweep_metrics() -> dict:
    """Every registered objective's sweep metrics: name → higher is better (evaluation/sweep.py)."""
    out: dict = {}
    for cls in registered():
        out.update(cls.sweep_metrics)
    return out


# The built-in objectives register themselves on import.
from witscale.training.objectives import sft as _sft  # noqa: E402,F401
from witscale.training.objectives import dpo as _dpo  # noqa: E402,F401
from witscale.training.objectives import simpo as _simpo  # noqa: E402,F401
from witscale.training.objectives import orpo as _orpo  # noqa: E402,F401

__all__ = ["HeadStats", "Objective", "OBJECTIVES", "DEFAULT_OBJECTIVE", "default_objective", "register", "unregister", "find_objective", "get_objective",
           "objective_for", "registered", "foreign_flags", "metric_tags", "sweep_metrics"]
