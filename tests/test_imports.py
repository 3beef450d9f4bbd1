"""Imports point one way (issue 11): chains import core; core never imports a chain; no chain
imports another.

Read from the source with ``ast`` (every ``import``, also those inside functions):

- a *chain* is a package ``src/vlmrel/<name>/`` for name in :data:`CHAINS` (``mcdo`` counts once
  it is a package);
- ``bench/`` (benchmarks) may import anything;
- everything else under ``src/vlmrel`` is *core*: the top-level modules and ``vlm/`` (the VLM
  client and its stand-in server, which must answer from the request, not from a chain's code).
"""

from __future__ import annotations

import ast
from pathlib import Path

from wfutil import REPO

SRC = REPO / "src" / "vlmrel"
CHAINS = ("teacher", "grounding", "anomaly", "mcdo")
FREE = ("bench",)


def present_chains(root: Path = SRC) -> tuple[str, ...]:
    return tuple(c for c in CHAINS if (root / c).is_dir())


def module_name(path: Path, root: Path = SRC) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = ["vlmrel", *rel.parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, root: Path = SRC) -> set[str]:
    """Every ``vlmrel`` module ``path`` imports (``from vlmrel import x`` counts as ``vlmrel.x``)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return {m for m in out if m == "vlmrel" or m.startswith("vlmrel.")}


def owner(module: str, chains: tuple[str, ...]) -> str:
    """``chain:<name>``, ``free`` or ``core`` for a ``vlmrel`` module name."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else ""
    if top in chains:
        return f"chain:{top}"
    if top in FREE:
        return "free"
    return "core"


def violations(root: Path = SRC) -> list[str]:
    chains = present_chains(root)
    found = []
    for path in sorted(root.rglob("*.py")):
        me = owner(module_name(path, root), chains)
        if me == "free":
            continue
        for mod in sorted(imported_modules(path, root)):
            other = owner(mod, chains)
            if not other.startswith("chain:") or other == me:
                continue
            rule = "core imports a chain" if me == "core" else "a chain imports another chain"
            found.append(f"{path.relative_to(root)}: imports {mod} ({rule})")
    return found


def test_imports_point_one_way():
    assert {"teacher", "grounding", "anomaly"} <= set(present_chains())
    assert violations() == []


def test_vlm_layer_knows_no_chain():
    for path in sorted((SRC / "vlm").rglob("*.py")):
        chains = {owner(m, CHAINS) for m in imported_modules(path)} - {"core"}
        assert not chains, f"{path}: {chains}"


def test_the_checker_finds_violations(tmp_path):
    root = tmp_path / "vlmrel"
    files = {
        "__init__.py": "",
        "io.py": "",
        "images.py": "def f():\n    from vlmrel.teacher import schema\n",  # core -> chain (lazy)
        "vlm/__init__.py": "from ..grounding.request import GROUNDING_SCHEMA\n",  # core -> chain (relative)
        "teacher/__init__.py": "from vlmrel import io\n",  # chain -> core: fine
        "teacher/schema.py": "from vlmrel import anomaly\n",  # chain -> chain
        "grounding/__init__.py": "",
        "grounding/request.py": "from . import parse\nfrom vlmrel.grounding import parse as p\n",  # own chain
        "grounding/parse.py": "",
        "anomaly/__init__.py": "",
        "mcdo/__init__.py": "import vlmrel.teacher.truth\n",  # chain -> chain, mcdo as a package
        "bench/__init__.py": "import vlmrel.teacher\nfrom vlmrel import mcdo\n",  # free
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    assert present_chains(root) == CHAINS
    assert violations(root) == [
        "images.py: imports vlmrel.teacher (core imports a chain)",
        "images.py: imports vlmrel.teacher.schema (core imports a chain)",
        "mcdo/__init__.py: imports vlmrel.teacher.truth (a chain imports another chain)",
        "teacher/schema.py: imports vlmrel.anomaly (a chain imports another chain)",
        "vlm/__init__.py: imports vlmrel.grounding.request (core imports a chain)",
        "vlm/__init__.py: imports vlmrel.grounding.request.GROUNDING_SCHEMA (core imports a chain)",
    ]
    # before mcdo is a package, a top-level mcdo module is core
    (root / "mcdo" / "__init__.py").unlink()
    (root / "mcdo").rmdir()
    (root / "mcdo.py").write_text("from vlmrel import io\n")
    assert present_chains(root) == ("teacher", "grounding", "anomaly")
    assert "mcdo" not in " ".join(violations(root))
