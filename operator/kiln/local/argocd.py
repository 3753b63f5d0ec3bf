"""Build Argo CD (application controller and repo server) from its Go module, cached per version.

Dev tooling for the GitOps e2e (e2e/test_gitops.py), not part of the product. Argo CD v3 is one
multi-call binary that runs the component named by the name it is invoked under, so the cache
folder holds `argocd` plus one symlink per component, and the module's CRDs (`crds/`). The binary
is built from our own main (`gotools-argocd/main.go`), which links only those components: upstream's
also links the CLI, the API server, Dex, notifications and the ApplicationSet controller.

The module needs a newer Go than the host's, fetched through the module proxy by GOTOOLCHAIN.
Its go.mod replaces the nested module `gitops-engine/v3` with `./gitops-engine`, a folder the
module download leaves out: the build copies the module into a scratch tree, places the nested
module (same version) there and builds `./cmd` inside that tree, so all its replace directives
apply. The cache folder's name hashes the version, toolchain, build command and platform (the
scheme of kiln.local.build): a second build finds the binary and builds nothing.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from kiln.local import build

VERSION = "v3.6.2"
MODULE = "github.com/argoproj/argo-cd/v3"
NESTED_MODULE = "github.com/argoproj/argo-cd/gitops-engine/v3"
NESTED_DIR = "gitops-engine"
GO_TOOLCHAIN = "go1.27.0"
BINARY = "argocd"
COMPONENTS = ("argocd-application-controller", "argocd-repo-server")
# The repo server runs this script from $PATH on every commit it reads (its image ships it);
# without it manifest generation fails with "permission denied".
VERIFY_WRAPPER = "git-verify-wrapper.sh"
# Our main, copied into the module's tree as MAIN_PACKAGE.
MAIN_SOURCE = Path(__file__).resolve().parent / "gotools-argocd" / "main.go"
MAIN_PACKAGE = "cmd/kiln-argocd"
# `version` stamps what `argocd-application-controller --version` reports.
LDFLAGS = f"-s -w -X github.com/argoproj/argo-cd/v3/common.version={VERSION.lstrip('v')}"


def build_command(output: Path) -> list[str]:
    """The `go build` command line, run inside the module's tree."""
    return [
        "go",
        "build",
        "-p",
        str(build.GO_BUILD_JOBS),
        "-trimpath",
        f"-ldflags={LDFLAGS}",
        "-o",
        str(output),
        f"./{MAIN_PACKAGE}",
    ]


def cache_key(platform: str) -> str:
    """`argocd-<version>-<hash of toolchain, build command and platform>`."""
    digest = hashlib.sha256()
    for part in (
        MODULE,
        VERSION,
        NESTED_MODULE,
        GO_TOOLCHAIN,
        " ".join(build_command(Path(BINARY))),
        MAIN_SOURCE.read_text(),
        platform,
    ):
        digest.update(part.encode())
        digest.update(b"\0")
    return f"argocd-{VERSION}-{digest.hexdigest()[:12]}"


def bin_dir() -> Path:
    """The cache folder for this version: `argocd`, the component links, the wrapper script, `crds/`."""
    return build.cache_root() / cache_key(build.target_platform())


def is_built(directory: Path) -> bool:
    return (
        all(os.access(directory / name, os.X_OK) for name in (BINARY, VERIFY_WRAPPER))
        and (directory / "crds").is_dir()
    )


def component(name: str, directory: Path | None = None) -> Path:
    """The path to run one component (a link named after it); raises BuildError if not built."""
    if name not in COMPONENTS:
        raise ValueError(f"unknown Argo CD component {name!r}; known: {', '.join(COMPONENTS)}")
    directory = directory or bin_dir()
    if not is_built(directory):
        raise build.BuildError(f"Argo CD is not built in {directory}; run `python -m kiln.local.argocd`")
    return directory / name


def crds_dir(directory: Path | None = None) -> Path:
    return (directory or bin_dir()) / "crds"


def go_environment() -> dict[str, str]:
    env = build.go_environment()
    env["GOTOOLCHAIN"] = GO_TOOLCHAIN
    return env


def ensure_built(progress: Callable[[str], None] = print) -> Path:
    """Build Argo CD into its cache folder unless it is there; return the folder.

    Concurrent callers take turns on a lock file; the second finds the first one's binary.
    """
    directory = bin_dir()
    if is_built(directory):
        progress(f"Argo CD {VERSION} cached in {directory}")
        return directory
    if shutil.which("go") is None:
        raise build.BuildError("Go is not installed (https://go.dev/dl/); it builds Argo CD")
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not is_built(directory):
            started = time.monotonic()
            _build_into(directory)
            progress(f"Argo CD {VERSION} built in {time.monotonic() - started:.0f} s into {directory}")
    return directory


def _go(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-30:])
        raise build.BuildError(f"`{' '.join(args)}` failed in {cwd}:\n{tail}")
    return result.stdout


def _download(module: str, scratch: Path, env: dict[str, str]) -> Path:
    """The module's source folder in the module cache (read-only), downloaded if needed."""
    out = _go(["go", "mod", "download", "-json", f"{module}@{VERSION}"], scratch, env)
    return Path(json.loads(out)["Dir"])


def _writable_copy(source: Path, target: Path) -> None:
    shutil.copytree(source, target, symlinks=True)
    for root, dirs, files in os.walk(target):
        for name in (*dirs, *files):
            path = Path(root) / name
            if not path.is_symlink():
                path.chmod(path.stat().st_mode | stat.S_IWUSR)
    target.chmod(target.stat().st_mode | stat.S_IWUSR)


def _build_into(directory: Path) -> None:
    env = go_environment()
    with tempfile.TemporaryDirectory(prefix="argocd-build-") as scratch_name:
        scratch = Path(scratch_name)
        tree = scratch / "argo-cd"
        _writable_copy(_download(MODULE, scratch, env), tree)
        nested = tree / NESTED_DIR
        if nested.exists():
            raise build.BuildError(f"{MODULE}@{VERSION} now ships {NESTED_DIR}/; drop the separate download")
        _writable_copy(_download(NESTED_MODULE, scratch, env), nested)
        (tree / MAIN_PACKAGE).mkdir(parents=True)
        shutil.copy(MAIN_SOURCE, tree / MAIN_PACKAGE / "main.go")
        partial = directory / f".{BINARY}.{os.getpid()}.partial"
        _go(build_command(partial), tree, env)
        crds = directory / "crds"
        shutil.rmtree(crds, ignore_errors=True)
        shutil.copytree(tree / "manifests" / "crds", crds)
        shutil.copy(tree / "hack" / VERIFY_WRAPPER, directory / VERIFY_WRAPPER)
        (directory / VERIFY_WRAPPER).chmod(0o755)
        for name in COMPONENTS:
            link = directory / name
            link.unlink(missing_ok=True)
            link.symlink_to(BINARY)
        partial.replace(directory / BINARY)


if __name__ == "__main__":
    ensure_built()
