"""Each component's imports read one way: the operator (`kiln`) never imports the autoscaler, the
autoscaler uses only the operator's API, its label names (`kiln.labels`, constants: the autoscaler
selects router pods by them) and the shared `kiln.common`, the engine imports neither,
`kiln.common` depends on no other part of `kiln`, the router reads only the engine's metric names,
and nothing imports the router. Read from the source (ast), so a new import anywhere, even one
inside a function, breaks the build."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
PACKAGES = {
    "kiln": ROOT / "operator" / "kiln",
    "kiln_autoscaler": ROOT / "autoscaler" / "kiln_autoscaler",
    "kiln_engine": ROOT / "engine-image" / "kiln_engine",
    "kiln_router": ROOT / "router" / "kiln_router",
}


def module_name(package: str, path: Path) -> str:
    parts = path.relative_to(PACKAGES[package]).with_suffix("").parts
    return ".".join((package, *parts[: -1 if parts[-1] == "__init__" else None]))


def imports(package: str, path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in `path`, relative ones resolved."""
    here = module_name(package, path).split(".")
    if path.name != "__init__.py":
        here = here[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            if node.module:
                yield node.lineno, ".".join([*base, node.module])
            else:  # `from .. import api`: each name is a module of the base package
                yield from ((node.lineno, ".".join([*base, alias.name])) for alias in node.names)


def forbidden(package: str, allowed: tuple[str, ...], denied: tuple[str, ...]) -> list[str]:
    """Imports in `package` of a module under `denied` and not under `allowed`."""
    under = lambda name, roots: any(name == r or name.startswith(r + ".") for r in roots)  # noqa: E731
    found = []
    for path in sorted(PACKAGES[package].rglob("*.py")):
        if not under(module_name(package, path), allowed):
            for line, name in imports(package, path):
                if under(name, denied) and not under(name, allowed):
                    found.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return found


@pytest.mark.parametrize(
    ("package", "allowed", "denied"),
    [
        ("kiln", (), ("kiln_autoscaler", "kiln_router")),
        ("kiln_autoscaler", ("kiln.api", "kiln.common", "kiln.labels"), ("kiln", "kiln_router")),
        ("kiln_engine", (), ("kiln", "kiln_autoscaler", "kiln_router")),
        # The router reads the engine's metric names and nothing else of another part (it runs from
        # the control-plane image, which has no torch).
        ("kiln_router", ("kiln_engine.metric_names",), ("kiln", "kiln_autoscaler", "kiln_engine")),
    ],
)
def test_components_import_one_way(package: str, allowed: tuple[str, ...], denied: tuple[str, ...]) -> None:
    assert forbidden(package, allowed, denied) == []


def test_the_shared_package_depends_on_no_other_part_of_kiln() -> None:
    paths = sorted((PACKAGES["kiln"] / "common").rglob("*.py"))
    assert paths, "kiln.common is where the operator and the autoscaler share code"
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in paths
        for line, name in imports("kiln", path)
        if ((name == "kiln" or name.startswith("kiln.")) and not name.startswith("kiln.common"))
        or name.startswith("kiln_autoscaler")
    ]
    assert offenders == []


def test_the_checker_sees_relative_and_nested_imports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rule cannot pass vacuously: it finds imports written in each of the ways Python allows."""
    package = tmp_path / "kiln"
    (package / "sub").mkdir(parents=True)
    (package / "sub" / "__init__.py").write_text("from ..other import x\n")
    (package / "sub" / "mod.py").write_text("def f():\n    import kiln_autoscaler.leader\n")
    (package / "sub" / "rel.py").write_text("from .. import api\n")
    monkeypatch.setitem(PACKAGES, "kiln", package)
    found = {name for path in package.rglob("*.py") for _, name in imports("kiln", path)}
    assert found == {"kiln.other", "kiln_autoscaler.leader", "kiln.api"}
