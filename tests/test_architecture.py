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
    {"fedtune.config", "fedtune.sections"},
    {"fedtune.protocol", "fedtune.data", "fedtune.results.env_info"},
    {"fedtune.models", "fedtune.train", "fedtune.faults", "fedtune.secagg", "fedtune.state",
     "fedtune.attacks", "fedtune.devices"},
    {"fedtune.task", "fedtune.privacy", "fedtune.results", "fedtune.centralized",
     "fedtune.audit", "fedtune.personal"},
    {"fedtune.server", "fedtune.client"},
    {"fedtune.engine", "fedtune.studies", "fedtune.deploy"},
    {"fedtune.cli", "fedtune.__main__", "fedtune", "fedtune.own_process"},
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


# --- facts about a table entry live in its entry ------------------------------------------------

def _entry_names() -> set[str]:
    from fedtune.tables.datasets import DATASETS
    from fedtune.tables.model_kinds import MODEL_KINDS
    from fedtune.tables.privacy_modes import PRIVACY_MODES
    from fedtune.tables.runtimes import RUNTIMES
    from fedtune.tables.strategies import STRATEGIES

    return {*DATASETS, *MODEL_KINDS, *PRIVACY_MODES, *RUNTIMES, *STRATEGIES}


INTERFACES = {"Strategy", "PrivacyMode", "PrivacyServer"}  # what an entry's class implements


def _implementation_classes(trees: dict[Path, ast.Module]) -> set[str]:
    """Names of the classes that implement a table entry: every class a table names, every
    class of ``strategies/``, and the package's subclasses of them or of the interfaces an
    entry implements (a Flower ``Strategy``, ``PrivacyMode``, ``PrivacyServer``; an interface
    itself is not an implementation)."""
    from fedtune.tables.datasets import DATASETS
    from fedtune.tables.model_kinds import MODEL_KINDS
    from fedtune.tables.privacy_modes import PRIVACY_MODES
    from fedtune.tables.runtimes import RUNTIMES
    from fedtune.tables.strategies import STRATEGIES

    named = {entry.implementation.partition(":")[2]
             for table in (DATASETS, MODEL_KINDS, PRIVACY_MODES, RUNTIMES, STRATEGIES)
             for entry in table.values()}
    named |= {entry.client.partition(":")[2] for entry in STRATEGIES.values() if entry.client}
    found = {*INTERFACES, *named} - {""}  # "": an entry without a client side, or a base
    # that is no name (``Mapping[str, X]``), which no class is a subclass of by name
    classes = [node for path, tree in trees.items() for node in ast.walk(tree)
               if isinstance(node, ast.ClassDef)]
    found |= {node.name for path, tree in trees.items() if path.parts[-2] == "strategies"
              for node in tree.body if isinstance(node, ast.ClassDef)}
    while True:
        more = {node.name for node in classes if node.name not in found and any(
            (base.id if isinstance(base, ast.Name) else getattr(base, "attr", "")) in found
            for base in node.bases)}
        if not more:
            return found - INTERFACES
        found |= more


def _entry_name_checks() -> list[str]:
    """Every place outside ``fedtune/tables/`` where code compares a value with a table
    entry's name ("fedavgm", "central", "mlp", ..., or a constant holding such names), compares
    ``type(...)`` of something with an implementation (an entry's ``load()``, a class of one),
    or picks behaviour by ``isinstance`` of an entry's implementation class."""
    names = _entry_names()
    paths = [p for p in [*PACKAGE.rglob("*.py"), *(REPO / "strategies").glob("*.py")]
             if "tables" not in p.relative_to(REPO).parts]
    trees = {p: ast.parse(p.read_text(encoding="utf-8")) for p in paths}

    def named(node: ast.AST, constants: dict[str, set[str]]) -> set[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return {node.value} & names
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return set().union(*(named(item, constants) for item in node.elts))
        if isinstance(node, ast.Name):
            return constants.get(node.id, set())
        return set()

    constants: dict[str, set[str]] = {}  # module-level constants that hold entry names
    for tree in trees.values():
        for node in tree.body:
            if (isinstance(node, ast.Assign) and len(node.targets) == 1
                    and isinstance(node.targets[0], ast.Name)
                    and (held := named(node.value, {}))):
                constants[node.targets[0].id] = held
    implementations = _implementation_classes(trees)
    found = []
    for path, tree in trees.items():
        where = path.relative_to(REPO)
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                typed = any(isinstance(side, ast.Call) and isinstance(side.func, ast.Name)
                            and side.func.id == "type" for side in sides) and any(
                    isinstance(side, ast.Call) and not (isinstance(side.func, ast.Name)
                                                        and side.func.id == "type")
                    or (isinstance(side, ast.Name) and side.id in implementations)
                    for side in sides)
                if typed or any(named(side, constants) for side in sides):
                    found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
            elif isinstance(node, ast.MatchValue) and named(node.value, constants):
                found.append(f"{where}:{node.lineno}: case {ast.unparse(node.value)}")
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                  and node.func.id == "isinstance" and len(node.args) == 2):
                kinds = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [
                    node.args[1]]
                if any((k.id if isinstance(k, ast.Name) else getattr(k, "attr", ""))
                       in implementations for k in kinds):
                    found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    return sorted(found)


def test_no_code_outside_the_tables_branches_on_an_entry():
    """What an entry is (a runtime that computes in this process, the server optimizer a
    strategy runs under central DP, ...) is a field of the entry; code reads the field, never
    compares a config value with an entry's name or tests for an implementation class."""
    assert _entry_name_checks() == []
