"""Standalone diffusers custom-code files, generated from this package's own modules at export time.

An exported pipeline must load with ``DiffusionPipeline.from_pretrained(path_or_repo, trust_remote_code=True)`` on a
machine without ``edm2_diffusers``. diffusers (0.42) finds custom code through ``model_index.json``:

* ``"_class_name": ["pipeline_edm2", "EDM2Pipeline"]`` with ``pipeline_edm2.py`` at the pipeline's root;
* a component entry ``"unet": ["unet_edm2", "EDM2UNet2DModel"]`` with ``unet/unet_edm2.py`` in the component folder.

diffusers copies each such file into its module cache and imports it. It follows ``from .x import y`` imports only
for files that sit next to the entry file and, on the Hub, downloads only ``<component>/<module>.py`` for a component.
So every generated file is *self-contained*: :func:`bundle_module` flattens a package module together with the package
modules it imports (dependencies first) into one source file and drops the package-internal imports, whose names are
then defined earlier in the same file. The bundle is written fresh from the installed sources at every export, so the
code in an export is exactly the code that produced it.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..pipelines import EDM2Pipeline

PACKAGE = "edm2_diffusers"


@dataclass(frozen=True)
class CustomCodeSpec:
    """Where one class of this package goes in an export.

    Args:
        module (`str`): the package module defining the class, e.g. ``"edm2_diffusers.models.unet_edm2"``.
        class_name (`str`): the class, e.g. ``"EDM2UNet2DModel"``.
        file_stem (`str`): the file name (without ``.py``) in the export, i.e. the first entry of the
            ``[module, class]`` pair in ``model_index.json``.
    """

    module: str
    class_name: str
    file_stem: str


# The classes an EDM2 pipeline export carries as custom code, by the qualified name of the class.
CUSTOM_CODE = {
    "edm2_diffusers.pipelines.pipeline_edm2.EDM2Pipeline": CustomCodeSpec(
        "edm2_diffusers.pipelines.pipeline_edm2", "EDM2Pipeline", "pipeline_edm2"
    ),
    "edm2_diffusers.models.unet_edm2.EDM2UNet2DModel": CustomCodeSpec(
        "edm2_diffusers.models.unet_edm2", "EDM2UNet2DModel", "unet_edm2"
    ),
    "edm2_diffusers.schedulers.scheduling_edm_heun.EDMHeunScheduler": CustomCodeSpec(
        "edm2_diffusers.schedulers.scheduling_edm_heun", "EDMHeunScheduler", "scheduling_edm_heun"
    ),
}


class BundleError(ValueError):
    """A package module cannot be flattened into a standalone custom-code file."""


# ----------------------------------------------------------------------------------------------------------------
# Flattening package modules into one file.


def _module_file(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        raise BundleError(f"cannot find the source file of module {name!r}")
    return Path(spec.origin)


def _is_package_module(name: str | None, package: str = PACKAGE) -> bool:
    return name is not None and (name == package or name.startswith(package + "."))


def _absolute(node: ast.ImportFrom, module: str, is_pkg_init: bool) -> str | None:
    """The absolute module name of a ``from ... import`` statement in ``module``."""
    if node.level == 0:
        return node.module
    package = module if is_pkg_init else module.rpartition(".")[0]
    return importlib.util.resolve_name("." * node.level + (node.module or ""), package)


def _defining_module(target: str, name: str, where: str, package: str) -> str:
    """The package module that defines ``name`` imported from ``target`` (follows re-exports of ``__init__``)."""
    mod = importlib.import_module(target)
    is_submodule = hasattr(mod, "__path__") and importlib.util.find_spec(f"{target}.{name}") is not None
    if not hasattr(mod, name) and not is_submodule:
        raise BundleError(f"{where}: module {target!r} has no attribute {name!r}")
    if is_submodule or inspect.ismodule(getattr(mod, name)):
        raise BundleError(
            f"{where}: 'from {target} import {name}' imports a module; import the names it uses instead "
            "so that the module can be bundled into a standalone custom-code file"
        )
    defining = getattr(getattr(mod, name), "__module__", None)
    if isinstance(defining, str) and _is_package_module(defining, package) and defining != target:
        return defining
    return target


@dataclass
class _Parsed:
    name: str
    package: str
    source: str
    tree: ast.Module
    deps: list  # package modules this module imports names from, in order
    edits: list  # (first_line, last_line, replacement lines) of package imports to rewrite
    future: set


def _parse(name: str, package: str) -> _Parsed:
    path = _module_file(name)
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path))
    is_init = path.name == "__init__.py"
    deps, edits, future = [], [], set()
    lines = source.splitlines()
    for node in ast.walk(tree):
        where = f"{path.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            bad = [a.name for a in node.names if _is_package_module(a.name, package)]
            if bad:
                raise BundleError(
                    f"{where}: 'import {bad[0]}' cannot be bundled; use 'from {bad[0]} import <names>' instead"
                )
            continue
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.module == "__future__":
            future.update(a.name for a in node.names)
            edits.append((node.lineno, node.end_lineno, []))
            continue
        target = _absolute(node, name, is_init)
        if not _is_package_module(target, package):
            continue
        if any(a.name == "*" for a in node.names):
            raise BundleError(f"{where}: 'from {target} import *' cannot be bundled; import names explicitly")
        indent = re.match(r"\s*", lines[node.lineno - 1]).group(0)
        replacement = []
        for alias in node.names:
            dep = _defining_module(target, alias.name, where, package)
            if dep == name:
                raise BundleError(f"{where}: module {name!r} imports from itself")
            if dep not in deps:
                deps.append(dep)
            if alias.asname and alias.asname != alias.name:
                replacement.append(f"{indent}{alias.asname} = {alias.name}")
        # Inside a function or `if`, keep the block non-empty in case the import was its only statement.
        edits.append((node.lineno, node.end_lineno, replacement or ([f"{indent}pass"] if indent else [])))
    return _Parsed(name, package, source, tree, deps, edits, future)


def _top_level_bindings(parsed: _Parsed) -> dict:
    """Top-level names a module binds, each with what it is bound to: a definition or an imported object."""
    bindings = {}
    for node in parsed.tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bindings[node.name] = ("defined in", parsed.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for sub in ast.walk(target):
                    if isinstance(sub, ast.Name):
                        bindings[sub.id] = ("defined in", parsed.name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                bindings[a.asname or a.name.split(".")[0]] = ("import", a.name if a.asname else a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module != "__future__":
            if not _is_package_module(node.module, parsed.package):
                for a in node.names:
                    bindings[a.asname or a.name] = ("import", f"{node.module}.{a.name}")
    bindings.pop("__all__", None)
    return bindings


def _rewrite(parsed: _Parsed, keep_all: bool) -> str:
    lines = parsed.source.splitlines()
    edits = list(parsed.edits)
    if not keep_all:
        for node in parsed.tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else []
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
                edits.append((node.lineno, node.end_lineno, []))
    for first, last, replacement in sorted(edits, key=lambda e: e[0], reverse=True):
        lines[first - 1 : last] = replacement
    return "\n".join(lines).strip("\n")


def _ordered_modules(entry: str, package: str = PACKAGE) -> list[_Parsed]:
    """The entry module and its package dependencies, dependencies first (depth-first topological order)."""
    order, state = [], {}

    def visit(name: str, chain: tuple):
        if state.get(name) == "done":
            return
        if state.get(name) == "active":
            raise BundleError(f"circular package imports: {' -> '.join(chain + (name,))}")
        state[name] = "active"
        parsed = _parse(name, package)
        for dep in parsed.deps:
            visit(dep, chain + (name,))
        state[name] = "done"
        order.append(parsed)

    visit(entry, ())
    return order


def bundle_module(entry: str, header: str | None = None, package: str = PACKAGE) -> str:
    """Flatten package module ``entry`` and the package modules it imports into one self-contained source file.

    Third-party imports stay as they are; imports of names from this package are dropped (or become ``alias = name``)
    because those names are defined earlier in the bundle. The bundle is parsed again before it is returned.

    Args:
        entry (`str`): a module of this package, e.g. ``"edm2_diffusers.models.unet_edm2"``.
        header (`str`, *optional*): a comment block placed at the top of the file.
        package (`str`): the top-level package whose imports are flattened (this one by default).

    Returns:
        `str`: the source code.

    Raises:
        `BundleError`: for imports that cannot be flattened (``import edm2_diffusers.x``, star imports, importing a
            module object, circular imports) or when two bundled modules define the same top-level name.
    """
    if not _is_package_module(entry, package):
        raise BundleError(f"{entry!r} is not a module of {package}")
    modules = _ordered_modules(entry, package)
    bound = {}  # name -> (binding, module)
    for parsed in modules:
        for n, binding in _top_level_bindings(parsed).items():
            if n in bound and (binding != bound[n][0] or binding[0] == "defined in"):
                raise BundleError(
                    f"cannot bundle {entry}: top-level name {n!r} means different things in {bound[n][1]} and "
                    f"{parsed.name}; rename one of them"
                )
            bound[n] = (binding, parsed.name)
    future = set().union(*(p.future for p in modules))
    parts = []
    if header:
        parts.append("\n".join("# " + line if line else "#" for line in header.splitlines()))
    if future:
        parts.append(f"from __future__ import {', '.join(sorted(future))}")
    for parsed in modules:
        parts.append(f"# {'-' * 112}\n# From {parsed.name}\n\n" + _rewrite(parsed, keep_all=parsed.name == entry))
    code = "\n\n\n".join(parts) + "\n"
    try:
        ast.parse(code)
    except SyntaxError as err:  # a bug of the bundler, not of the user's input
        raise BundleError(f"the bundle of {entry} does not parse: {err}") from err
    return code


# ----------------------------------------------------------------------------------------------------------------
# Writing the custom code of an exported pipeline.


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__name__}"


def _header(spec: CustomCodeSpec, bundled: list[str]) -> str:
    return (
        f"{spec.file_stem}.py: {spec.class_name} as diffusers custom code (trust_remote_code=True).\n"
        f"\n"
        f"Generated by edm2-diffusers {__version__} when this pipeline was exported; do not edit.\n"
        f"Bundled from the package modules: {', '.join(bundled)}.\n"
        f"With the package installed, edm2_diffusers.hub.load_pipeline loads the same files without remote code."
    )


def write_custom_code(pipeline_dir: str | os.PathLike) -> dict:
    """Add the custom-code files to a pipeline saved with ``save_pretrained`` and point ``model_index.json`` at them.

    The pipeline class goes to ``<pipeline_dir>/<stem>.py`` and ``_class_name`` becomes ``[stem, class]``; every
    component whose class is one of this package's (see :data:`CUSTOM_CODE`) gets ``<component>/<stem>.py`` and the
    entry ``[stem, class]``. Components from diffusers (e.g. an ``AutoencoderKL``) keep their library entries.

    Args:
        pipeline_dir (`str` or `os.PathLike`): a folder written by ``EDM2Pipeline.save_pretrained``.

    Returns:
        `dict`: the new ``model_index.json`` content.
    """
    pipeline_dir = Path(pipeline_dir)
    index_path = pipeline_dir / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    bundles = {}

    def bundle(spec: CustomCodeSpec) -> str:
        if spec.module not in bundles:
            names = [p.name for p in _ordered_modules(spec.module)]
            bundles[spec.module] = bundle_module(spec.module, header=_header(spec, names))
        return bundles[spec.module]

    def spec_for(library: str, class_name: str) -> CustomCodeSpec | None:
        if not isinstance(library, str) or not _is_package_module(library):
            return None
        cls = getattr(importlib.import_module(library), class_name, None)
        if cls is None:
            raise BundleError(f"model_index.json names {library}.{class_name}, which does not exist")
        spec = CUSTOM_CODE.get(_qualname(cls))
        if spec is None:
            raise BundleError(
                f"{_qualname(cls)} has no entry in edm2_diffusers.hub.remote_code.CUSTOM_CODE, so an export holding "
                "it could not load without the package"
            )
        return spec

    pipeline_cls = index["_class_name"]
    if isinstance(pipeline_cls, str):
        pipeline_cls = [EDM2Pipeline.__module__, pipeline_cls] if pipeline_cls == EDM2Pipeline.__name__ else None
    spec = spec_for(*pipeline_cls) if pipeline_cls else None
    if spec is None:
        raise BundleError(f"{index_path} is not an EDM2Pipeline export (_class_name={index['_class_name']!r})")
    (pipeline_dir / f"{spec.file_stem}.py").write_text(bundle(spec), encoding="utf-8")
    index["_class_name"] = [spec.file_stem, spec.class_name]

    for component, entry in list(index.items()):
        if component.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or entry[0] is None:
            continue
        spec = spec_for(*entry)
        if spec is None:
            continue
        folder = pipeline_dir / component
        if not folder.is_dir():
            raise BundleError(f"component folder {folder} is missing")
        (folder / f"{spec.file_stem}.py").write_text(bundle(spec), encoding="utf-8")
        index[component] = [spec.file_stem, spec.class_name]

    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return index


__all__ = ["CUSTOM_CODE", "CustomCodeSpec", "BundleError", "bundle_module", "write_custom_code"]
