"""The package's layering, read from its import statements (ast, nothing is imported).

The kernel core imports strictly downward (`_library` -> `_checks` -> `reference` -> `ops` ->
`checkpoints` -> `sae`, with `_io` and `testing` beside them); `integrations` builds on the core,
`workflow` on `integrations`, `cli` on everything, and never the reverse. Nothing above the SAE
reaches into a private name of the ops or the SAE, and no module imports itself back through
another, not even from inside a function.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "safedig_kernels"

# Rank of each room: a module may import rooms of its own rank or lower.
CORE_RANK = {"_library": 0, "_io": 0, "_checks": 1, "reference": 2, "ops": 3, "checkpoints": 4, "sae": 5,
             "testing": 5, "_imports": 0}
UPPER = ("bench", "integrations", "workflow", "cli")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str, bool]]:
    """(imported module, imported name or "", at module level?) for every import in `path`."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    here = name if is_package else name.rpartition(".")[0]
    top_level = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, "", id(node) in top_level) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                # `from pkg import submodule` imports the submodule; `from mod import name` the module
                target, imported = (sub, "") if sub in modules else (base, a.name)
                out.append((target, imported, id(node) in top_level))
    return [(m, n, top) for m, n, top in out if m == "safedig_kernels" or m.startswith("safedig_kernels.")]


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


@pytest.fixture(scope="module")
def graph() -> dict[str, list[tuple[str, str, bool]]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_the_reader_sees_the_imports(graph):
    # so that the rules below, which look for imports that should not be there, can fail
    edges = {(m, t) for m, imports in graph.items() for t, _, _ in imports}
    assert ("safedig_kernels.sae", "safedig_kernels.checkpoints") in edges
    assert ("safedig_kernels.ops.steer", "safedig_kernels.ops._launch") in edges
    assert ("safedig_kernels.workflow.capture", "safedig_kernels.integrations.diffusers.sites") in edges
    assert ("safedig_kernels.ops.topk_encode", "safedig_kernels._checks") in edges


def test_the_core_imports_downward_only(graph):
    bad = []
    for module, imports in graph.items():
        room = _room(module)
        if room not in CORE_RANK:
            continue
        for target, _, _ in imports:
            other = _room(target)
            if other in UPPER or (other in CORE_RANK and CORE_RANK[other] > CORE_RANK[room]):
                bad.append(f"{module} -> {target}")
    assert bad == []


@pytest.mark.parametrize("room,forbidden", [
    ("integrations", ("workflow", "cli", "bench")),
    ("workflow", ("cli", "bench")),
    ("bench", ("integrations", "workflow", "cli")),
])
def test_upper_rooms_never_import_the_rooms_above_them(graph, room, forbidden):
    bad = [f"{m} -> {t}" for m, imports in graph.items() if _room(m) == room
           for t, _, _ in imports if _room(t) in forbidden]
    assert bad == []


def test_nothing_above_the_sae_uses_a_private_op_or_sae_name(graph):
    bad = []
    for module, imports in graph.items():
        if _room(module) not in ("integrations", "workflow", "cli"):
            continue
        for target, name, _ in imports:
            private_module = any(part.startswith("_") for part in target.split(".")[1:])
            if _room(target) in ("ops", "sae", "reference") and (private_module or name.startswith("_")):
                bad.append(f"{module} imports {target}{'.' + name if name else ''}")
    assert bad == []


def test_no_import_cycle(graph):
    # Function-level imports count too: a cycle hidden in a function is still a cycle.
    edges = {m: sorted({t for t, _, _ in imports if t in graph and t != m}) for m, imports in graph.items()}

    def parents(m: str) -> set[str]:  # importing a.b.c runs a and a.b first; those are not cycles
        parts = m.split(".")
        return {".".join(parts[:i]) for i in range(1, len(parts))}

    cycles = []
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        stack.append(m)
        for t in edges[m]:
            if t in parents(m):
                continue
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [])
    assert cycles == []


@pytest.mark.parametrize("statement", [
    "import safedig_kernels",
    "import safedig_kernels.workflow, safedig_kernels.integrations",
    "from safedig_kernels.integrations.diffusers.config import SafeDIGConfig",
    "from safedig_kernels.workflow.route import route; from safedig_kernels.workflow.store import ActivationStore",
    "import safedig_kernels.cli",
])
def test_importing_the_library_never_imports_diffusers(statement):
    code = f"import sys; {statement}; assert 'diffusers' not in sys.modules, sorted(sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]



def test_the_format_layer_exports_formats_only():
    # checkpoints/ sits under the SAE: what it exports is read into SAEWeights, never a TopKSAE,
    # and no module path outside the package's own tree resolves (sys.meta_path holds no alias).
    import importlib.util

    import safedig_kernels.checkpoints as ckpt

    assert [n for n in ckpt.__all__ if not hasattr(ckpt, n)] == []
    assert [n for n in ("load_sae", "save_sae", "load_safedig", "load_saelens", "load_sparsify", "TopKSAE")
            if hasattr(ckpt, n)] == []
    assert [m for m in ("safedig_kernels.training", "safedig_kernels.steering", "safedig_kernels.demo")
            if importlib.util.find_spec(m) is not None] == []
