"""The package's layering and public import paths, read from the source itself.

The layers stand on one another: `core` (sans-IO) at the bottom, then `stores`, `middleware`
and `integrations`. An arrow pointing the other way makes the lower layer drag the upper one
(and its frameworks) into every program that only wanted the lower one, and turns the import
graph into a cycle sooner or later. Nothing imports `cli`: it is the program's entry point.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "convex_guard"
# Found, not imported: the source rules hold (and fail with their own message) even when an
# import cycle keeps the package from importing at all.
_spec = importlib.util.find_spec(PACKAGE)
assert _spec is not None and _spec.origin is not None, f"{PACKAGE} is not on the path"
SRC = Path(_spec.origin).resolve().parent
README = ROOT / "README.md"

# What each layer may import of the package, its own layer included.
ALLOWED = {
    "core": {"core"},
    "stores": {"core", "stores"},
    "middleware": {"core", "stores", "middleware"},
    "integrations": {"core", "stores", "middleware", "integrations"},
    # Beside the middlewares, over the stores: nothing on the request path imports them.
    "alerts": {"core", "stores", "alerts"},
    "dashboard": {"core", "stores", "dashboard"},
}
# The public import paths; `convex_guard.wsgi` and `.django` are re-export shims.
PUBLIC_PATHS = ("convex_guard", "convex_guard.wsgi", "convex_guard.django")
# Top-level modules that only the code that needs them may import: a plain
# `import convex_guard` must work where none of them is installed.
OPTIONAL_ROOTS = ("pytest", "_pytest", "hypothesis", "django", "flask", "werkzeug", "convex")


@dataclass(frozen=True)
class Import:
    """One import of the package, where it stands and the module it reaches."""

    importer: str
    path: Path
    line: int
    text: str
    target: str
    relative: bool

    def __str__(self) -> str:
        where = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{self.importer} ({where}:{self.line}): {self.text}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(dotted: str) -> bool:
    parts = dotted.split(".")
    if parts[0] != PACKAGE:
        return False
    base = SRC.joinpath(*parts[1:])
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports_of(path: Path) -> list[Import]:
    """Every import of the package in `path`: at the top, under `TYPE_CHECKING`, inside
    functions, and `importlib.import_module("convex_guard....")` with a literal name."""
    source = path.read_text()
    tree = ast.parse(source, filename=str(path))
    importer = module_name(path)
    package = importer.split(".") if path.name == "__init__.py" else importer.split(".")[:-1]
    found: list[Import] = []

    def add(node: ast.stmt | ast.expr, target: str, relative: bool = False) -> None:
        text = " ".join((ast.get_source_segment(source, node) or "").split())
        found.append(Import(importer, path, node.lineno, text, target, relative))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    add(node, alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            if module.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                # `from convex_guard.core import limits` reaches the module `limits`.
                sub = f"{module}.{alias.name}"
                add(node, sub if is_module(sub) else module, relative=node.level > 0)
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            if (
                name in ("import_module", "__import__")
                and isinstance(first, ast.Constant)
                and isinstance(first.value, str)
                and first.value.split(".")[0] == PACKAGE
            ):
                add(node, first.value)
    return found


MODULES = sorted(SRC.rglob("*.py"))
IMPORTS = [each for path in MODULES for each in imports_of(path)]


def layer(dotted: str) -> str:
    """`core` for `convex_guard.core.limits`; the module itself for the top-level ones
    (`convex_guard`, `convex_guard.wsgi`, `convex_guard.cli`)."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else dotted


def test_every_subpackage_is_a_layer() -> None:
    """A new folder gets its place in the layering before it gets its first import."""
    folders = {path.parent.name for path in SRC.glob("*/__init__.py")}
    assert folders <= set(ALLOWED), f"no layering rule for {sorted(folders - set(ALLOWED))}"


def test_the_scan_sees_every_layer() -> None:
    """The rules below hold of what the scan read; it must have read the package."""
    layers = {layer(module_name(path)) for path in MODULES}
    present = {name for name in ALLOWED if (SRC / name / "__init__.py").exists()}
    assert present <= layers, f"layers found under {SRC}: {sorted(layers)}"
    arrows = {(layer(each.importer), layer(each.target)) for each in IMPORTS}
    assert ("middleware", "stores") in arrows and ("stores", "core") in arrows, sorted(arrows)


@pytest.mark.parametrize("name", list(ALLOWED))
def test_a_layer_imports_only_the_layers_below_it(name: str) -> None:
    allowed = ALLOWED[name]
    wrong = [
        f"{each} reaches {each.target}"
        for each in IMPORTS
        if layer(each.importer) == name and layer(each.target) not in allowed
    ]
    assert not wrong, f"`{name}` may import only {sorted(allowed)} of the package:\n" + "\n".join(
        wrong
    )


def test_nothing_imports_the_cli() -> None:
    # `python -m convex_guard` would be the one other way in: its `__main__` may run the CLI.
    wrong = [
        str(each)
        for each in IMPORTS
        if layer(each.target) == f"{PACKAGE}.cli" and each.importer != f"{PACKAGE}.__main__"
    ]
    assert not wrong, "the CLI is the entry point; nothing imports it:\n" + "\n".join(wrong)


def test_imports_inside_the_package_are_absolute() -> None:
    wrong = [str(each) for each in IMPORTS if each.relative]
    assert not wrong, "write `from convex_guard.<layer>.<module> import ...`:\n" + "\n".join(wrong)


def test_every_public_name_imports() -> None:
    convex_guard = importlib.import_module(PACKAGE)
    names: list[str] = convex_guard.__all__
    wrong = [
        f"`from convex_guard import {name}` fails"
        for name in names
        if not hasattr(convex_guard, name)
    ]
    wrong += [
        f"convex_guard.__all__ lists {name} twice"
        for name in sorted(set(names))
        if names.count(name) > 1
    ]
    assert not wrong, "\n".join(wrong)


def readme_imports() -> list[tuple[int, str, str]]:
    """(README line, module, name) for every `from convex_guard... import name` and
    `import convex_guard...` in the README's Python blocks."""
    text = README.read_text()
    found: list[tuple[int, str, str]] = []
    for block in re.finditer(r"```python\n(.*?)```", text, re.S):
        first_line = text.count("\n", 0, block.start(1)) + 1
        tree = ast.parse(block.group(1), filename="README.md")
        for node in ast.walk(tree):
            line = first_line + getattr(node, "lineno", 1) - 1
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == PACKAGE:
                found += [(line, node.module or "", alias.name) for alias in node.names]
            elif isinstance(node, ast.Import):
                found += [
                    (line, alias.name, "")
                    for alias in node.names
                    if alias.name.split(".")[0] == PACKAGE
                ]
    return found


def test_the_readme_import_paths_resolve() -> None:
    used = readme_imports()
    modules = {module for _, module, _ in used}
    wrong = [
        f"README.md shows no import from {path}" for path in PUBLIC_PATHS if path not in modules
    ]
    failed: set[str] = set()
    for line, module, name in used:
        statement = f"from {module} import {name}" if name else f"import {module}"
        if module in failed:
            continue
        try:
            imported = importlib.import_module(module)
        except ImportError as error:
            failed.add(module)
            wrong.append(f"README.md:{line}: {statement}: {error}")
            continue
        if name and not hasattr(imported, name) and not is_module(f"{module}.{name}"):
            wrong.append(f"README.md:{line}: {statement}: {module} has no {name}")
    assert not wrong, "\n".join(wrong)


# Run in a fresh interpreter: this one has pytest and whatever other tests imported.
# A finder ahead of the real ones notes which package module (and line) first asks for each
# optional top-level module; it finds nothing itself, so the import goes on as usual.
SPY = """
import json, linecache, sys

optional = set(sys.argv[1:])
already = sorted(name for name in sys.modules if name.split(".")[0] in optional)
asked = {}

class Spy:
    @staticmethod
    def find_spec(name, path=None, target=None):
        root = name.split(".")[0]
        if root in optional and root not in asked:
            frame = sys._getframe(1)
            while frame and not frame.f_globals.get("__name__", "").startswith("convex_guard"):
                frame = frame.f_back
            if frame is None:
                asked[root] = f"{name}, asked for outside convex_guard"
            else:
                line = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
                module = frame.f_globals["__name__"]
                asked[root] = f"{name}, by {module} line {frame.f_lineno}: {line}"
        return None

sys.meta_path.insert(0, Spy)
import convex_guard
loaded = sorted({name.split(".")[0] for name in sys.modules} & optional)
print(json.dumps({"already": already, "loaded": {root: asked.get(root, "?") for root in loaded}}))
"""


def test_importing_the_package_pulls_in_no_framework_or_test_tool() -> None:
    path = [str(SRC.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    result = subprocess.run(
        [sys.executable, "-c", SPY, *OPTIONAL_ROOTS],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, f"`import convex_guard` failed:\n{result.stderr[-2000:]}"
    report = json.loads(result.stdout)
    assert not report["already"], f"loaded before convex_guard was: {report['already']}"
    assert not report["loaded"], "`import convex_guard` imports:\n" + "\n".join(
        f"{root}: {where}" for root, where in report["loaded"].items()
    )
