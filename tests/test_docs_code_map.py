"""docs/README.md's code map names every module of witscale/ and tools/, and nothing that no longer exists.

The map's format (stated above it in docs/README.md): a line whose first word ends in ``/`` opens a package (the
rest of the line describes it); the indented lines under it name its modules, without ``.py``; ``#`` starts a
comment. A package is any directory of witscale/ or tools/ holding a ``.py`` file; ``__init__`` is not listed.
"""
from __future__ import annotations

import os
import re

import pytest

from tests.conftest import REPO_ROOT

ROOTS = ("witscale", "tools")
DOC = os.path.join(REPO_ROOT, "docs", "README.md")


def code_map_block(text: str) -> list[str]:
    """The lines of the first fenced block after the ``## Code map`` heading."""
    section = text.split("\n## Code map", 1)[1]
    return section.split("```", 2)[1].splitlines()[1:]


def parse_code_map(lines: list[str]) -> tuple[set[str], set[str]]:
    """(packages as 'witscale/data/', modules as 'witscale/data/loader') that the map names."""
    packages, modules, package = set(), set(), None
    for line in lines:
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if not line[0].isspace():
            if not words[0].endswith("/"):
                raise ValueError(f"docs/README.md code map: {line.strip()!r} opens no package (no trailing /)")
            package = words[0]
            packages.add(package)
        elif package is None:
            raise ValueError(f"docs/README.md code map: {line.strip()!r} is under no package")
        else:
            for name in words:
                if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                    raise ValueError(f"docs/README.md code map: {name!r} under {package} is not a module name "
                                     f"(a description needs a # before it)")
                modules.add(package + name)
    return packages, modules


def modules_on_disk(root: str = REPO_ROOT) -> tuple[set[str], set[str]]:
    packages, modules = set(), set()
    for top in ROOTS:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, top)):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
            rel = os.path.relpath(dirpath, root).replace(os.sep, "/") + "/"
            py = [f[:-3] for f in filenames if f.endswith(".py")]
            if py:
                packages.add(rel)
            modules.update(rel + m for m in py if m != "__init__")
    return packages, modules


def code_map_problems(doc_text: str, root: str = REPO_ROOT) -> str | None:
    """One line naming what the map lacks and what it names in vain, or None when it matches the tree."""
    listed_packages, listed_modules = parse_code_map(code_map_block(doc_text))
    packages, modules = modules_on_disk(root)
    missing = sorted((packages - listed_packages) | (modules - listed_modules))
    stale = sorted((listed_packages - packages) | (listed_modules - modules))
    parts = []
    if missing:
        parts.append("misses " + ", ".join(missing))
    if stale:
        parts.append("names what does not exist: " + ", ".join(stale))
    return "docs/README.md's code map " + "; ".join(parts) if parts else None


def test_the_code_map_lists_every_module_and_nothing_else():
    with open(DOC, encoding="utf-8") as f:
        problems = code_map_problems(f.read())
    if problems:
        pytest.fail(problems, pytrace=False)


def test_a_missing_module_and_a_stale_entry_are_named_in_one_line(tmp_path):
    for path in ("witscale/__init__.py", "witscale/train.py", "witscale/data/__init__.py", "witscale/data/loader.py",
                 "witscale/data/new_reader.py", "witscale/objectives/__init__.py", "tools/demo.py"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("")
    doc = ("# x\n\n## Code map\n\ntext\n\n```\nwitscale/data/   records\n  loader  format\nwitscale/   entry points\n"
           "  train   # flags → RunConfig\ntools/   tools\n  demo\n```\n\n## Next\n")
    assert code_map_problems(doc, str(tmp_path)) == (
        "docs/README.md's code map misses witscale/data/new_reader, witscale/objectives/; "
        "names what does not exist: witscale/data/format")
    fixed = doc.replace("loader  format", "loader  new_reader").replace("tools/", "witscale/objectives/  o\ntools/")
    assert code_map_problems(fixed, str(tmp_path)) is None


def test_a_description_without_a_comment_mark_is_refused():
    with pytest.raises(ValueError, match="'→' under witscale/ is not a module name"):
        parse_code_map(["witscale/   entry points", "  train  flags → RunConfig"])
