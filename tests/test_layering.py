"""The floors of the house, checked over folders (docs/architecture.md): a module added anywhere is covered.

    serve/bundle/   the bundle contract: imports nothing else of tuneforge; standard library, numpy and Pillow only
    serve runtime   (every serve module but the demo's and the server's): the bundle floor, serve's runtime modules,
                    and the runtime's own dependencies (numpy, onnxruntime, tokenizers, Pillow)
    serve server    serve.http, serve.ray: the runtime floor and its web stack (FastAPI, uvicorn, Prometheus, Ray);
                    the demo only to mount it (--demo)
    finetune/       never imports compress, nor serve beyond the bundle floor
    compress/       never imports serve beyond the bundle floor
Packages never import recipes/ (scripts, not a library).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
from conftest import REPO

PACKAGES = ("finetune", "compress", "serve")
# The demo's modules sit above the runtime: they open run directories with PyTorch (imported inside functions).
DEMO = {"serve.app", "serve.app_explain", "serve.__main__", "serve.sources", "serve.pytorch", "serve.login"}
BUNDLE_THIRD_PARTY = {"numpy", "PIL"}
RUNTIME_THIRD_PARTY = BUNDLE_THIRD_PARTY | {"onnxruntime", "tokenizers",
                                            "jinja2"}  # chat templates, imported when a prompt uses one
SERVER_THIRD_PARTY = RUNTIME_THIRD_PARTY | {"fastapi", "starlette", "uvicorn", "pydantic", "prometheus_client", "ray",
                                            "gradio"}


def modules() -> dict[str, Path]:
    """Every module of the three packages, by dotted name."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            if not all(part.isidentifier() for part in parts):  # e.g. datasets/json-extraction/make.py, a script
                continue
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(path: Path) -> set[str]:
    """The absolute module names a file imports (at top level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from serve import runtime`
    return names


def floor(name: str) -> str:
    if name == "serve.bundle" or name.startswith("serve.bundle."):
        return "bundle"
    if name in ("serve.http", "serve.ray") or name.startswith("serve.http."):
        return "server"
    if name.startswith("serve"):
        return "demo" if name in DEMO else "runtime"
    return name.split(".")[0]


def allowed(importer: str, imported: str) -> bool:
    """Whether a module of `importer`'s floor may import `imported`."""
    top = imported.split(".")[0]
    where, target = floor(importer), floor(imported)
    if top == "recipes":
        return False
    if top not in PACKAGES:  # a third-party or standard-library module
        if top in sys.stdlib_module_names or top == "__future__":
            return True
        if where == "bundle":
            return top in BUNDLE_THIRD_PARTY
        if where == "runtime":
            return top in RUNTIME_THIRD_PARTY
        if where == "server":
            return top in SERVER_THIRD_PARTY
        return True
    return {"bundle": {"bundle"}, "runtime": {"bundle", "runtime"}, "server": {"bundle", "runtime", "server", "demo"},
            "demo": {"bundle", "runtime", "demo", "finetune", "compress"},
            "finetune": {"bundle", "finetune"}, "compress": {"bundle", "finetune", "compress"}}[where].__contains__(
        target)


def test_the_floors_import_only_what_they_may():
    found = modules()
    assert len(found) > 60 and any(floor(n) == "bundle" for n in found) and any(floor(n) == "runtime" for n in found)
    broken = sorted(f"{name} imports {imported}" for name, path in found.items() for imported in imports_of(path)
                    if not allowed(name, imported))
    assert not broken, "layering broken (see docs/architecture.md):\n" + "\n".join(broken)


@pytest.mark.parametrize(("importer", "imported", "ok"), [
    ("serve.bundle.manifest", "compress.bundle", False), ("serve.bundle.manifest", "finetune.errors", False),
    ("serve.bundle.inputs", "torch", False), ("serve.runtime", "serve.sources", False),
    ("serve.runtime", "transformers", False), ("serve.predictors", "finetune.data", False),
    ("finetune.rundir", "compress.bundle", False), ("finetune.rundir", "serve.runtime", False),
    ("finetune.rundir", "serve.bundle.folders", True), ("compress.bundle", "serve.app", False),
    ("compress.training", "recipes.distill", False), ("serve.app", "finetune.config", True),
    ("serve.http.app", "fastapi", True), ("serve.runtime", "fastapi", False), ("serve.http.models", "torch", False),
    ("serve.http.app", "finetune.config", False),
])
def test_the_rules_themselves(importer, imported, ok):
    """The checker says no where it must (so the test above cannot pass by accident)."""
    assert allowed(importer, imported) is ok
