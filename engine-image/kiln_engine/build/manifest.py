"""The artifact manifest (`manifest.json`): what was built, from what, for which GPU, every file's sha256.

The manifest is written last, so its presence marks a complete artifact; `verify_artifact` re-checks
every listed file's size and sha256 and that nothing unlisted was added. The keys the loader reads
(`tensor_parallel_size`, `pipeline_parallel_size`, `quantization`, `dtype`) are top-level fields.
No torch here: the operator side and `kiln-engine verify` use it too.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
_CHUNK = 8 * 1024 * 1024


class VerificationError(Exception):
    """An artifact is incomplete, altered or not an artifact at all."""


class _Model(BaseModel):
    # Newer runtimes may add fields; an older verifier still reads the manifest.
    model_config = ConfigDict(extra="allow")


class RuntimeInfo(_Model):
    """The runtime that built the artifact (and must serve it)."""

    name: str = "kiln-engine"
    version: str
    backend: str = "torch"
    torch_version: str | None = None
    backend_version: str | None = None


class FileEntry(_Model):
    path: str  # relative, with forward slashes
    sha256: str
    size: int


class PipelineStage(_Model):
    """Decoder layers [first_layer, end_layer) of one pipeline stage, and the ranks that hold them."""

    stage: int
    first_layer: int
    end_layer: int
    ranks: list[int]


TTFT_PERCENTILES = (50, 90, 95, 99)  # the percentiles a capacity's TTFT target may hold at


class Capacity(_Model):
    """What one replica sustains, measured on the build device with synthetic load."""

    output_tokens_per_second: float
    prefill_tokens_per_second: float
    max_concurrency_at_ttft_target: int
    ttft_target_ms: float
    ttft_percentile: int = 90  # the TTFT percentile the target holds at (manifests before it: p90)
    ttft_ms_at_max_concurrency: float | None = None  # TTFT at that percentile
    ttft_p90_ms_at_max_concurrency: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    measured_on: str = ""
    duration_s: float = 0.0


class Manifest(_Model):
    format_version: int = FORMAT_VERSION
    runtime: RuntimeInfo
    backend: str = "torch"
    gpu_arch: str
    source: str
    source_fingerprint: str = ""
    architecture: str = ""
    config_hash: str
    quantization: str
    kv_cache_dtype: str = "auto"
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    expert_parallel: bool = False
    pipeline_stages: list[PipelineStage] = Field(default_factory=list)
    weight_files: dict[str, list[str]] = Field(default_factory=dict)
    build_options: dict[str, Any] = Field(default_factory=dict)
    files: list[FileEntry]
    capacity: Capacity | None = None
    created_at: str


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of a config dict in canonical form (key order and whitespace do not matter)."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _listed_files(root: Path) -> list[str]:
    """Every regular file under `root` but the manifest, as sorted relative posix paths."""
    out = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel != MANIFEST_NAME:
                out.append(rel)
    return sorted(out)


def file_entries(root: Path) -> list[FileEntry]:
    """Checksums of every file under `root` (the manifest excluded)."""
    return [
        FileEntry(path=rel, sha256=sha256_file(root / rel), size=(root / rel).stat().st_size)
        for rel in _listed_files(root)
    ]


def write_manifest(root: Path, manifest: Manifest) -> Path:
    """Write `root/manifest.json` atomically (temp file, fsync, rename): readers see all of it or none."""
    path = root / MANIFEST_NAME
    tmp = root / f".{MANIFEST_NAME}.tmp"
    with open(tmp, "w") as f:
        f.write(manifest.model_dump_json(indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(root)
    return path


def fsync_dir(path: Path) -> None:
    """Make a rename or new file in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_manifest(root: Path) -> Manifest:
    path = Path(root) / MANIFEST_NAME
    if not path.is_file():
        raise VerificationError(f"{root}: no {MANIFEST_NAME}; not a finished artifact")
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        raise VerificationError(f"{path}: not a valid Kiln manifest: {exc}") from exc


def verify_artifact(root: Path) -> Manifest:
    """The manifest of `root` once every file checks out; VerificationError lists all faults."""
    root = Path(root)
    manifest = read_manifest(root)
    problems: list[str] = []
    listed = set()
    for entry in manifest.files:
        listed.add(entry.path)
        path = root / entry.path
        if not path.is_file():
            problems.append(f"{entry.path}: missing")
            continue
        size = path.stat().st_size
        if size != entry.size:
            problems.append(f"{entry.path}: size {size} != {entry.size} in the manifest")
            continue
        digest = sha256_file(path)
        if digest != entry.sha256:
            problems.append(f"{entry.path}: sha256 {digest[:12]}… != {entry.sha256[:12]}… in the manifest")
    problems += [f"{rel}: not in the manifest" for rel in _listed_files(root) if rel not in listed]
    if problems:
        raise VerificationError(f"{root}: artifact does not match its manifest: " + "; ".join(problems))
    return manifest
