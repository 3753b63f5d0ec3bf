"""Where Kiln's shipped files live, in a source checkout and in an installed wheel."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def repo_root() -> Path | None:
    """The source checkout this package runs from, or None when installed from a wheel."""
    candidate = PACKAGE_DIR.parents[1]
    if (candidate / "pyproject.toml").is_file() and (candidate / "operator" / "kiln").is_dir():
        return candidate
    return None


def crds_dir() -> Path:
    """The generated CRD folder: `crds/` in a checkout, `kiln/crds` inside a wheel."""
    root = repo_root()
    return root / "crds" if root else PACKAGE_DIR / "crds"


def state_dir() -> Path:
    """Per-checkout working state (local cluster, logs): `.kiln/` at the repo root, else ~/.kiln."""
    root = repo_root()
    return root / ".kiln" if root else Path.home() / ".kiln"
