"""Debian's `prometheus` package for the tests: its `prometheus` and `promtool`, fetched when absent.

CI runs on a fresh Debian machine without them. `apt-get download` + `dpkg-deb -x` takes the
package's files without running its maintainer scripts, so no system service is started and no
user is created (what `apt-get install` would do), and nothing outside the cache folder changes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

# Unpacked under the toolchain cache, next to `kiln local build`'s binaries.
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kiln" / "prometheus"


def find_or_fetch(tool: str) -> Path:
    """`tool` (prometheus or promtool): on PATH, else from Debian's package unpacked into CACHE.

    Raises RuntimeError when neither works (not Debian, or the package cannot be downloaded).
    """
    found = shutil.which(tool)
    if found:
        return Path(found)
    binary = CACHE / "usr" / "bin" / tool
    if binary.is_file():
        return binary
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError(f"{tool} is not on PATH and this is not a Debian machine: install Prometheus")
    download = CACHE.with_name("prometheus-download")
    shutil.rmtree(download, ignore_errors=True)
    download.mkdir(parents=True)

    def fetch() -> subprocess.CompletedProcess[str]:
        return subprocess.run(["apt-get", "download", "prometheus"], cwd=download, capture_output=True,
                              text=True, timeout=600, check=False)  # fmt: skip

    done = fetch()
    if done.returncode != 0 and os.geteuid() == 0:  # a fresh machine has no package lists yet
        subprocess.run(["apt-get", "update"], capture_output=True, timeout=600, check=False)
        done = fetch()
    debs = sorted(download.glob("prometheus_*.deb"))
    if done.returncode != 0 or not debs:
        raise RuntimeError(f"apt-get download prometheus failed:\n{done.stdout}\n{done.stderr}")
    unpacking = CACHE.with_name("prometheus-unpacking")
    shutil.rmtree(unpacking, ignore_errors=True)
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpacking)], check=True, timeout=300)
    shutil.rmtree(CACHE, ignore_errors=True)  # a tree left without its binary
    unpacking.replace(CACHE)  # whole: a half-unpacked tree is never used
    shutil.rmtree(download, ignore_errors=True)
    if not binary.is_file():
        raise RuntimeError(f"Debian's prometheus package has no usr/bin/{tool}")
    return binary
