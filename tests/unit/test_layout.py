"""The package's layout rules (docs/architecture.md), checked on the source so that they hold after every change.

- no import cycle between our modules (module-level imports; a package importing its own submodules is no cycle);
- no source file over 700 lines, no function over 80 lines unless ``LONG_FUNCTIONS`` gives the reason;
- imports of our own modules at the top of the file: a function-level one carries a ``# lazy:`` comment saying why;
- no module imports another's underscore names;
- the pytest plugin loads without torch (a user's ``pytest --help`` must not pay for it).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("ryzen_opt", "pytest_ryzen")
MAX_FILE_LINES = 700
MAX_FUNCTION_LINES = 80

# qualified name -> why it stays longer than MAX_FUNCTION_LINES. Empty is the goal; an entry whose function is gone
# or got short fails test_long_function_reasons_are_current, so the list cannot rot.
LONG_FUNCTIONS: dict[str, str] = {
    "ryzen_opt.measure.timing.compare": "the public sampler: 18 keyword arguments and the docstring that defines "
    "each; its body is 30 lines over helpers (_warm_up, _calibrate, _sample_pairs, _measurement)",
}


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


MODULES = _modules()
TREES = {name: ast.parse(path.read_text(encoding="utf-8"), filename=str(path)) for name, path in MODULES.items()}


def _imported(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """Our modules that ``node`` (in ``module``) imports: the module, and submodules named in ``from x import``."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in MODULES]
    if node.level:
        base = module.split(".")
        if MODULES[module].name != "__init__.py":
            base = base[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    names = [target] + [f"{target}.{a.name}" for a in node.names]
    return [n for n in names if n in MODULES]


def _module_level_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: the body, and inside module-level ``try``/``if`` blocks, except
    ``if TYPE_CHECKING:`` (read by type checkers only)."""
    stack: list[ast.stmt] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                stack.extend(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            stack.extend(node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body])


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, tree in TREES.items():
        for node in _module_level_imports(tree):
            for target in _imported(name, node):
                # A package's own modules import it (Python imports parents first); its __init__ importing them back
                # is how packages re-export, not a cycle.
                if target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _functions(tree: ast.Module, prefix: str) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Every function and method with its qualified name (nested ones count towards their outer function too)."""

    def walk(node: ast.AST, qual: str) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{qual}.{child.name}", child
                yield from walk(child, f"{qual}.{child.name}")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{qual}.{child.name}")
            else:
                yield from walk(child, qual)

    yield from walk(tree, prefix)


def _length(node: ast.AST) -> int:
    return int(node.end_lineno or node.lineno) - node.lineno + 1


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_file_over_700_lines():
    sources = [*MODULES.values()]
    for package in PACKAGES:
        sources += [p for p in (ROOT / package).rglob("*") if p.suffix in (".cpp", ".h", ".cu", ".hip")]
    long = {str(p.relative_to(ROOT)): n for p in sources if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert long == {}


def test_no_function_over_80_lines_without_a_reason():
    long = {
        qual: _length(node)
        for name, tree in TREES.items()
        for qual, node in _functions(tree, name)
        if _length(node) > MAX_FUNCTION_LINES and qual not in LONG_FUNCTIONS
    }
    assert long == {}


def test_long_function_reasons_are_current():
    lengths = {qual: _length(node) for name, tree in TREES.items() for qual, node in _functions(tree, name)}
    stale = [q for q in LONG_FUNCTIONS if lengths.get(q, 0) <= MAX_FUNCTION_LINES]
    assert stale == []


def test_own_imports_at_the_top_unless_a_comment_says_why():
    unexplained = []
    for name, tree in TREES.items():
        lines = MODULES[name].read_text().splitlines()
        for _, function in _functions(tree, name):
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and _imported(name, node):
                    above = lines[node.lineno - 2] if node.lineno >= 2 else ""
                    if "# lazy:" not in above and "# lazy:" not in lines[node.lineno - 1]:
                        unexplained.append(f"{MODULES[name].relative_to(ROOT)}:{node.lineno}")
    assert sorted(set(unexplained)) == []


def test_no_module_imports_another_modules_private_names():
    private = [
        f"{MODULES[name].relative_to(ROOT)}:{node.lineno} {alias.name}"
        for name, tree in TREES.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and _imported(name, node)
        for alias in node.names
        if alias.name.startswith("_") and not alias.name.startswith("__")
    ]
    assert private == []


@pytest.mark.parametrize("module", ["pytest_ryzen.plugin", "ryzen_opt", "ryzen_opt.cli", "ryzen_opt.validation.gates"])
def test_torch_free_entry_points_import_no_torch(module: str):
    code = f"import sys, {module}; sys.exit(3 if 'torch' in sys.modules else 0)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"importing {module} imported torch" + done.stderr
