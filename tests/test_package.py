"""The pass is a lean library: what ``import sliceout_fx`` pulls in, and how its modules import
each other.

The experiments (benchmarks, demo, data loaders) live in ``sliceout_lab`` and drawing needs the
``draw`` extra; importing the core must not load them, nor their heavy dependencies beyond what
``torch`` itself imports. The core's modules import one another without cycles at import time
(an import inside a function, or under ``TYPE_CHECKING``, runs later and is no cycle).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "sliceout_fx"


def _modules_loaded_by(code: str) -> set[str]:
    script = f"import sys, json\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    return {name.split(".")[0] for name in json.loads(out)}


def test_importing_the_core_loads_no_experiment_code_nor_its_dependencies() -> None:
    baseline = _modules_loaded_by("import torch, networkx")
    core = _modules_loaded_by("import sliceout_fx")
    added = core - baseline
    assert "sliceout_lab" not in added
    for heavy in ("matplotlib", "tqdm", "numpy", "pandas", "transformers", "torchvision", "timm"):
        assert heavy not in added, f"import sliceout_fx loads {heavy}"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path) -> set[str]:
    """The ``sliceout_fx`` modules a module imports when it is itself imported."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    modules = {_module_name(p) for p in CORE.rglob("*.py")}
    found = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:  # module level only
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # ``from . import mha`` imports the submodule; ``from .api import convert`` the module
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    return {m for m in found if m in modules and m != name}


def test_the_core_has_no_import_cycles() -> None:
    graph = nx.DiGraph()
    for path in CORE.rglob("*.py"):
        for imported in _top_level_imports(path):
            graph.add_edge(_module_name(path), imported)
    # A package importing its own submodules is how packages work; a submodule importing its
    # package back (or any longer loop) is a cycle.
    cycles = [
        c
        for c in nx.simple_cycles(graph)
        if not (len(c) == 2 and any(c[i].startswith(c[1 - i] + ".") for i in range(2)))
    ]
    assert not cycles, f"import cycles in sliceout_fx: {cycles[:5]}"
