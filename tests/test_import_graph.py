"""The package's imports point down only and form no cycle (issue 16): the module-level import graph
of hmtrec is acyclic, every module imports on its own in a fresh interpreter, and nothing below the
config kinds (hmtrec/pipelines) imports them, not even inside a function."""

import ast
import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import hmtrec

PACKAGE = Path(hmtrec.__file__).parent
ROOT = PACKAGE.parent
# Above the kinds: the API, the CLI and its commands, studies. Everything else is below them.
ABOVE_KINDS = ("hmtrec.pipelines", "hmtrec.api", "hmtrec.cli", "hmtrec.commands", "hmtrec.tune")


@functools.lru_cache(maxsize=1)
def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(name: str, path: Path, module_level_only: bool) -> set[str]:
    """hmtrec modules `name` imports (a `from X import y` counts X, and X.y when it is a module)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else ast.walk(tree)
    known = modules()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] + [node.module or ""]).strip(".") \
                if node.level else node.module
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return {target for target in out if target in known and target != name}


def test_the_module_level_import_graph_has_no_cycle():
    known = modules()
    graph = {name: imported(name, path, module_level_only=True) for name, path in known.items()}
    done, active, cycles = set(), [], []

    def visit(name):
        if name in active:
            cycles.append(active[active.index(name):] + [name])
            return
        if name in done:
            return
        active.append(name)
        for target in sorted(graph[name]):
            visit(target)
        active.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)
    assert cycles == [], " | ".join(" -> ".join(cycle) for cycle in cycles)


def test_nothing_below_the_kinds_imports_them():
    offenders = sorted(f"{name} imports {target}" for name, path in modules().items()
                       if not name.startswith(ABOVE_KINDS)
                       for target in imported(name, path, module_level_only=False)
                       if target.startswith("hmtrec.pipelines"))
    assert offenders == []


def test_every_module_imports_on_its_own():
    """Each module first in a clean state (every hmtrec module forgotten), so an import order that
    only works because another module was imported first fails here. One interpreter, to keep it fast."""
    names = sorted(name for name in modules() if name != "hmtrec.__main__")
    script = textwrap.dedent("""
        import importlib, sys
        failed = []
        for name in sys.argv[1:]:
            for loaded in [m for m in sys.modules if m == "hmtrec" or m.startswith("hmtrec.")]:
                del sys.modules[loaded]
            try:
                importlib.import_module(name)
            except Exception as error:
                failed.append(f"{name}: {type(error).__name__}: {error}")
        print("\\n".join(failed))
        sys.exit(1 if failed else 0)
        """)
    result = subprocess.run([sys.executable, "-c", script, *names], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
