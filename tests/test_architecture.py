"""The package's shape, as the architecture asks: small modules, short functions, the bundled files' import rule."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "edm2_diffusers"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 100
# The two long functions that read best whole: the U-Net's construction and the pipeline's sampling loop.
LONG_FUNCTIONS_ALLOWED = {"EDM2UNet2DModel.__init__", "EDM2Pipeline.__call__"}
# What the bundled custom-code files (and the modules they flatten in) may import from the package.
BUNDLED = ("models", "schedulers", "pipelines", "edm.py", "latents.py")


def modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def functions(tree):
    """(qualified name, line count) of every function, methods named Class.method."""

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                yield name, child.end_lineno - child.lineno + 1
                yield from walk(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")

    yield from walk(tree, "")


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_and_function_sizes(path):
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{path.name} has more than {MAX_MODULE_LINES} lines"
    too_long = {
        name: n
        for name, n in functions(ast.parse(text))
        if n > MAX_FUNCTION_LINES and name not in LONG_FUNCTIONS_ALLOWED
    }
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines in {path.name}: {too_long}"


def test_bundled_modules_import_only_the_ground_floor():
    allowed = {"edm", "latents", "models", "schedulers", "pipelines"}
    for path in modules():
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] not in BUNDLED:
            continue
        in_subpackage = len(rel.parts) > 1
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            if in_subpackage and node.level == 1:
                continue  # a sibling in the same subpackage
            target = (node.module or "").split(".")[0]
            assert target in allowed, f"{rel} imports {'.' * node.level}{node.module or ''} outside the ground floor"
