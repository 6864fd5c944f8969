"""Imports point down the layers only, including imports inside functions (docs/architecture.md).

    domain (serve_app.domain, serve_app/__init__)  <-  engines (serve_app.engines)
        <-  deployments  <-  assembly (serve_app's top-level modules, serve_app.examples, cluster)

bench/ and tests/ sit above everything and may import any layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"domain": 0, "engines": 1, "deployments": 2, "assembly": 3}
FIRST_PARTY = ("serve_app", "deployments", "cluster")


def layer_of(module: str) -> str | None:
    """The layer of a first-party module name, or None for third-party modules."""
    parts = module.split(".")
    if parts[0] == "deployments":
        return "deployments"
    if parts[0] == "cluster":
        return "assembly"
    if parts[0] != "serve_app":
        return None
    if len(parts) == 1 or parts[1] == "domain":
        return "domain"
    if parts[1] == "engines":
        return "engines"
    return "assembly"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in ``source``, at any depth."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def upward_imports(source: str, module: str) -> list[str]:
    own = LAYERS[layer_of(module)]
    problems = []
    for line, imported in imported_modules(source):
        target = layer_of(imported)
        if target is not None and LAYERS[target] > own:
            problems.append(f"{module}:{line} ({layer_of(module)}) imports {imported} ({target})")
    return problems


def source_files() -> list[Path]:
    return sorted(p for package in FIRST_PARTY for p in (ROOT / package).rglob("*.py"))


def test_no_module_imports_a_layer_above_its_own():
    files = source_files()
    assert len(files) > 30  # the walk found the code
    problems = [problem for path in files for problem in upward_imports(path.read_text(), module_name(path))]
    assert problems == [], "\n".join(problems)


def test_every_layer_has_modules():
    layers = {layer_of(module_name(path)) for path in source_files()}
    assert layers == set(LAYERS)


@pytest.mark.parametrize("source, module, upward", [
    ("def build():\n    from deployments.router import Router\n", "serve_app.domain.specs", True),
    ("import serve_app.builder\n", "serve_app.engines.base", True),
    ("from serve_app.openai_api import create_api\n", "deployments.router", True),
    ("from serve_app import __version__\n", "serve_app.engines.base", False),
    ("from serve_app.engines import load_engine\n", "deployments.model_replica", False),
    ("import torch\nfrom ray import serve\n", "serve_app.domain.catalog", False),
])
def test_the_check_sees_imports_at_any_depth(source, module, upward):
    assert bool(upward_imports(source, module)) is upward


def import_graph() -> dict[str, set[str]]:
    """First-party module -> the first-party modules it imports (at any depth, lazy imports included), each
    ``from package import name`` counted as an import of ``package.name`` when that is a module."""
    modules = {module_name(path): path for path in source_files()}
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        edges = set()
        for node in runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {alias.name for alias in node.names if alias.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module in modules:
                named = {f"{node.module}.{alias.name}" for alias in node.names}
                edges |= (named & set(modules)) or {node.module}
        graph[module] = edges - {module}
    return graph


def runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` but those under ``if TYPE_CHECKING:``, whose imports only annotations see."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            yield from (n for child in node.orelse for n in [child, *runtime_nodes(child)])
            continue
        yield node
        yield from runtime_nodes(node)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.get(module, ()):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_no_import_cycle():
    """A cycle (engines/base.py <-> engines/loras.py was the last) means neither module can be read alone."""
    assert cycles(import_graph()) == []


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"a"}, "c": {"a"}}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
])
def test_the_cycle_finder_finds_cycles(graph, expected):
    assert cycles(graph) == expected


# Private members of libraries that the code reaches on purpose, each with why (a first-party private member is
# never on this list: give it a public name instead).
THIRD_PARTY_PRIVATE = {
    ("serve_app/engines/host_copies.py", "_parameters"): "torch: a module's tensors replaced in place",
    ("serve_app/engines/host_copies.py", "_buffers"): "torch: a module's tensors replaced in place",
    ("serve_app/engines/loading.py", "_exclude_from_cpu_offload"): "diffusers: the nunchaku transformer kept out",
    ("serve_app/engines/memory_trace.py", "_cdata"): "torch: a storage's identity while tracing",
    ("serve_app/engines/memory_trace.py", "_pytree"): "torch.utils._pytree: walking nested outputs",
    ("serve_app/engines/optimizations.py", "_active_backend"): "diffusers: the process-wide attention backend",
    ("serve_app/engines/pipeline_call.py", "_interrupt"): "diffusers: stopping between steps",
    ("serve_app/engines/qwen_image_edit.py", "_unpack_latents"): "diffusers: the pipeline's own latent unpacking",
    ("serve_app/engines/qwen_image_21.py", "_unpack_latents"): "diffusers: the pipeline's own latent unpacking",
    ("serve_app/openai_api/forms.py", "_get_form"): "starlette: Request's form parser, bounded",
}


def private_reaches(path: Path) -> list[str]:
    """``x._name`` where x is not self or cls and ``_name`` is not defined in this file, and ``from first_party
    import _name``: a module reaching into another's private members."""
    tree = ast.parse(path.read_text())
    own = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef |
                                                                    ast.ClassDef)}
    own |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute) and
            isinstance(node.ctx, ast.Store)}
    relative = str(path.relative_to(ROOT))
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
                and node.attr not in own and (relative, node.attr) not in THIRD_PARTY_PRIVATE):
            found.append(f"{relative}:{node.lineno} {ast.unparse(node)}")
        if (isinstance(node, ast.ImportFrom) and node.module and layer_of(node.module) is not None):
            found += [f"{relative}:{node.lineno} imports {node.module}.{alias.name}" for alias in node.names
                      if alias.name.startswith("_") and not alias.name.startswith("__")]
    return found


def test_no_module_reaches_into_another_modules_private_members():
    problems = [problem for path in source_files() for problem in private_reaches(path)]
    assert problems == [], "\n".join(problems)


MAX_FUNCTION_LINES = 80


def test_no_function_in_the_service_is_longer_than_a_screen():
    """Past 80 lines a function glues several things together (create_api held 128 lines of closures)."""
    long = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for package in ("serve_app", "deployments") for path in sorted((ROOT / package).rglob("*.py"))
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == [], "\n".join(long)
