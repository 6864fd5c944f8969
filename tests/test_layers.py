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
