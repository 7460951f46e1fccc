"""What the shipped packages import: declared dependencies match, and the layers stay apart.

The imports are read from the source with ``ast`` (every ``import`` statement, including those
inside functions and ``if TYPE_CHECKING:`` blocks), so nothing is imported to check them.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ("pipeline", "dashboard", "schemas", "loadgen")  # [tool.setuptools.packages.find]

# Declared but not imported yet, on purpose. Keep each entry explained.
NOT_YET_IMPORTED: set[str] = set()


def _canonical(name: str) -> str:
    """A distribution name as PEP 503 compares them (``PyYAML`` == ``pyyaml``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _imports(path: Path) -> Iterator[tuple[str, int]]:
    """Every absolute module name ``path`` imports, with its line."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module, node.lineno
        elif (
            isinstance(node, ast.Call)
            and _is_import_call(node.func)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.args[0].value, node.lineno  # importlib.import_module("x.y"), __import__


def _is_import_call(func: ast.expr) -> bool:
    if isinstance(func, ast.Name):
        return func.id in {"__import__", "import_module"}
    return isinstance(func, ast.Attribute) and func.attr == "import_module"


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _third_party_imports() -> dict[str, list[str]]:
    """Top-level module -> where it is imported (``file:line``), for non-stdlib, non-own modules."""
    out: dict[str, list[str]] = {}
    for package in SHIPPED:
        for path in _sources(package):
            for module, line in _imports(path):
                top = module.partition(".")[0]
                if top in SHIPPED or top in sys.stdlib_module_names or top == "__future__":
                    continue
                out.setdefault(top, []).append(f"{path.relative_to(ROOT)}:{line}")
    return out


def _declared() -> set[str]:
    """The canonical names of ``[project].dependencies`` (extras and versions dropped)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    names = set()
    for requirement in project["dependencies"]:
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
        assert match, f"unreadable requirement {requirement!r}"
        names.add(_canonical(match.group(1)))
    return names


def test_every_imported_distribution_is_declared_and_every_declared_one_imported() -> None:
    providers = importlib.metadata.packages_distributions()
    declared = _declared()
    used: set[str] = set()
    problems = []
    for top, where in sorted(_third_party_imports().items()):
        dists = {_canonical(d) for d in providers.get(top, [])}
        if not dists:
            problems.append(
                f"{top!r} (imported at {where[0]}) comes from no installed distribution"
            )
        elif not dists & declared:
            problems.append(
                f"{top!r} (imported at {where[0]}) comes from {' or '.join(sorted(dists))}, "
                "which [project].dependencies does not declare"
            )
        used |= dists & declared
    allowed = {_canonical(name) for name in NOT_YET_IMPORTED}
    problems += [
        f"{dist} is declared in [project].dependencies but no shipped package imports it"
        for dist in sorted(declared - used - allowed)
    ]
    problems += [
        f"{dist} is on NOT_YET_IMPORTED but is imported now (drop it from the allow-list)"
        for dist in sorted(allowed & used)
    ]
    problems += [
        f"{dist} is on NOT_YET_IMPORTED but not declared (drop it from the allow-list)"
        for dist in sorted(allowed - declared)
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("package", ["dashboard", "loadgen"])
def test_package_imports_nothing_from_pipeline(package: str) -> None:
    """The dashboard and the load generator share only ``schemas`` with the worker."""
    found = [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for path in _sources(package)
        for module, line in _imports(path)
        if module.partition(".")[0] == "pipeline"
    ]
    assert _sources(package), f"no sources found under {package}/"
    assert not found, f"{package}/ imports from pipeline:\n" + "\n".join(found)


def test_the_import_scan_sees_imports_inside_functions(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "from __future__ import annotations\n"
        "def f():\n"
        "    from pipeline.settings import WorkerSettings\n"
        "    import pipeline.cli as cli\n"
        "    return importlib.import_module('pipeline.verify')\n",
        encoding="utf-8",
    )
    assert [m for m, _ in _imports(source)] == [
        "__future__",
        "pipeline.settings",
        "pipeline.cli",
        "pipeline.verify",
    ]
