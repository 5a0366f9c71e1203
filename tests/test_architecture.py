"""The package's shape: layers that import only downwards, two wings that never import each other,
no import cycle, and a config that loads without torch, Flower or Ray."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "fedtune"
# Lower layers never import higher ones; a module may import its own layer's other packages
# only as listed in SAME_LAYER. The wings (server, client) sit side by side.
LAYERS = [
    {"fedtune.errors", "fedtune.tables"},
    {"fedtune.config"},
    {"fedtune.protocol", "fedtune.data", "fedtune.results.env_info"},
    {"fedtune.models", "fedtune.train", "fedtune.faults", "fedtune.secagg", "fedtune.state",
     "fedtune.attacks"},
    {"fedtune.task", "fedtune.privacy", "fedtune.results", "fedtune.centralized",
     "fedtune.audit"},
    {"fedtune.server", "fedtune.client"},
    {"fedtune.engine", "fedtune.studies", "fedtune.deploy"},
    {"fedtune.cli", "fedtune.__main__", "fedtune"},
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _runtime_imports(path: Path) -> set[str]:
    """Every fedtune module ``path`` imports when it runs (``if TYPE_CHECKING:`` blocks are
    only read by type checkers and left out)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.If) and isinstance(node.test, ast.Name)
                and node.test.id == "TYPE_CHECKING"):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            # ``from package import submodule`` imports the submodule, anything else the module
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if _is_module(submodule) else node.module)
    return {name for name in found if name == "fedtune" or name.startswith("fedtune.")}


def _is_module(name: str) -> bool:
    path = REPO.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _runtime_imports(path) & set(modules) for name, path in modules.items()}


def _layer(module: str) -> int:
    best = -1, -1  # (prefix length, layer)
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best[0]:
                best = len(prefix), index
    return best[1]


def test_every_module_has_a_layer():
    assert [m for m in _graph() if _layer(m) < 0] == []


def test_layers_import_only_downwards_and_the_wings_never_meet():
    upward = []
    for module, targets in _graph().items():
        for target in targets:
            if _layer(target) > _layer(module):
                upward.append(f"{module} -> {target}")
            if {module.split(".")[:2][-1], target.split(".")[:2][-1]} == {"server", "client"}:
                upward.append(f"{module} -> {target} (wings)")
    assert upward == []


def test_the_server_reaches_neither_the_client_nor_an_engine():
    graph = _graph()
    reached, todo = set(), [m for m in graph if m.startswith("fedtune.server")]
    while todo:
        module = todo.pop()
        for target in graph[module] - reached:
            reached.add(target)
            todo.append(target)
    assert sorted(m for m in reached if m.startswith(("fedtune.client", "fedtune.engine"))) == []


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for target in sorted(graph[module]):
            if target == module or target.startswith(module + "."):
                continue  # a package importing its own submodules
            if state.get(target) == 1:
                return path + [target]
            if target not in state and (cycle := visit(target, path + [target])):
                return cycle
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            assert visit(module, [module]) is None


def test_strategies_depend_on_flower_and_numpy_only():
    for path in (REPO / "strategies").glob("*.py"):
        assert _runtime_imports(path) == set(), path.name


@pytest.mark.parametrize("code", [
    "import fedtune.config",
    "from fedtune.cli import main; main(['run', '--set', 'data.alpha=-1'])",
])
def test_config_and_its_errors_load_no_torch_flower_or_ray(code):
    """A config mistake is reported before any heavy library loads (well under a second)."""
    probe = (f"import sys\ntry:\n    {code}\nexcept SystemExit:\n    pass\n"
             "heavy = sorted({m.split('.')[0] for m in sys.modules} & "
             "{'torch', 'flwr', 'ray', 'transformers', 'opacus'})\nprint(heavy)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=REPO, timeout=60)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


def test_the_architecture_page_lists_every_module():
    readme = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    modules = [str(p.relative_to(REPO)) for p in PACKAGE.rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py")]
    assert [m for m in modules if m not in readme] == []
