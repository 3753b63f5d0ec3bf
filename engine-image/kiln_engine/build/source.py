"""Where checkpoints and artifacts live: parsing `pvc://`, `hf://`, `s3://` URIs and moving files.

* a plain path (or `file:///path`): used in place;
* `pvc://claim/path`: the claim mounted at `$KILN_PVC_ROOT/claim` (default root `/mnt/pvc`);
* `hf://org/name[@revision]`: downloaded with `huggingface_hub.snapshot_download` (token `$HF_TOKEN`);
* `s3://bucket/prefix`: downloaded or uploaded with boto3 (optional; a clear error without it).

Parsing is pure; `fetch` and `upload_s3` are the I/O edges.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln_engine.build.manifest import MANIFEST_NAME

DEFAULT_PVC_ROOT = "/mnt/pvc"
SCHEMES = ("file", "pvc", "hf", "s3")
# What a Hugging Face snapshot needs for building: configs, safetensors weights, tokenizer files.
HF_PATTERNS = ("*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.tiktoken")


class SourceError(Exception):
    """A URI that is malformed, or a location that cannot be read; `reason` is CamelCase for status."""

    def __init__(self, message: str, reason: str = "CheckpointNotFound") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Location:
    """A parsed URI: `scheme` (file, pvc, hf, s3), the path after it, and an hf revision."""

    scheme: str
    path: str
    revision: str | None = None

    def __str__(self) -> str:
        if self.scheme == "file":
            return self.path
        rev = f"@{self.revision}" if self.revision else ""
        return f"{self.scheme}://{self.path}{rev}"


def parse_uri(uri: str) -> Location:
    """Parse a checkpoint or artifact location; raises SourceError for anything malformed."""
    if not uri:
        raise SourceError("empty location", "InvalidCheckpoint")
    if "://" not in uri:
        return Location("file", uri)
    scheme, _, rest = uri.partition("://")
    scheme = scheme.lower()
    if scheme not in SCHEMES:
        raise SourceError(
            f"{uri}: unsupported scheme {scheme!r}; use a path, pvc://, hf:// or s3://", "InvalidCheckpoint"
        )
    if scheme == "file":
        if not rest.startswith("/"):
            raise SourceError(f"{uri}: file:// needs an absolute path", "InvalidCheckpoint")
        return Location("file", rest)
    if scheme == "hf":
        repo, _, revision = rest.partition("@")
        parts = repo.strip("/").split("/")
        if len(parts) != 2 or not all(parts):
            raise SourceError(f"{uri}: expected hf://org/name[@revision]", "InvalidCheckpoint")
        return Location("hf", "/".join(parts), revision or None)
    path = rest.strip("/")
    head = rest.split("/", 1)[0]
    if not head or not path:
        what = "bucket" if scheme == "s3" else "claim"
        raise SourceError(f"{uri}: expected {scheme}://{what}/path", "InvalidCheckpoint")
    return Location(scheme, path)


def pvc_root() -> Path:
    return Path(os.environ.get("KILN_PVC_ROOT") or DEFAULT_PVC_ROOT)


def local_path(loc: Location) -> Path:
    """The local directory of a path or pvc:// location (hf:// and s3:// must be fetched first)."""
    if loc.scheme == "file":
        return Path(loc.path)
    if loc.scheme == "pvc":
        return pvc_root() / loc.path
    raise SourceError(f"{loc}: {loc.scheme}:// is remote; it has no local path", "InvalidCheckpoint")


def work_dir() -> Path:
    """Scratch space for downloads (`$KILN_WORK_DIR`, default <tmp>/kiln)."""
    import tempfile

    return Path(os.environ.get("KILN_WORK_DIR") or Path(tempfile.gettempdir()) / "kiln")


def fetch(uri: str, dest: Path, progress: Callable[[float, str], None] | None = None) -> Path:
    """A local directory holding `uri`'s files: local ones in place, remote ones downloaded under `dest`."""
    loc = parse_uri(uri)
    report = progress or (lambda fraction, message: None)
    if loc.scheme in ("file", "pvc"):
        path = local_path(loc)
        if not path.exists():
            hint = f" (pvc root {pvc_root()})" if loc.scheme == "pvc" else ""
            raise SourceError(f"{uri}: {path} does not exist{hint}")
        if not path.is_dir():
            raise SourceError(f"{uri}: {path} is not a directory", "InvalidCheckpoint")
        report(1.0, f"local: {path}")
        return path
    if loc.scheme == "hf":
        return _fetch_hf(loc, dest / "hf", report)
    return _fetch_s3(loc, dest / "s3" / loc.path, report)


def hub_failure(loc: Location, exc: BaseException, token_sent: bool) -> SourceError:
    """The SourceError for a failed hub download, decided by the HTTP status under `exc`.

    401 and 403 are `Unauthorized` whatever huggingface_hub calls them (it turns a 401 into
    "repository not found", since the hub answers 401 for private and missing repositories alike);
    the message never carries the exception's text, so nothing of the request can leak into it.
    """
    status = http_status(exc)
    if status in (401, 403):
        if token_sent:
            return SourceError(
                f"{loc}: the Hugging Face Hub rejected the credentials (HF_TOKEN) with HTTP {status}: "
                "the token is invalid or expired, or has no access to this repository",
                "Unauthorized",
            )
        return SourceError(
            f"{loc}: the Hugging Face Hub refused access without credentials (HTTP {status}): "
            "the repository is private, gated or missing; set HF_TOKEN to a token with access",
            "Unauthorized",
        )
    name = type(exc).__name__
    if name == "RevisionNotFoundError":
        return SourceError(f"{loc}: revision {loc.revision!r} not found")
    if name in ("RepositoryNotFoundError", "GatedRepoError") or status == 404:
        return SourceError(f"{loc}: repository not found (HTTP {status})")
    return SourceError(
        f"{loc}: cannot fetch from the Hugging Face Hub: {name} (HTTP {status})", "FetchFailed"
    )


def http_status(exc: BaseException) -> int | None:
    """The status of the HTTP response an exception (or one it was raised from) carries, if any."""
    seen: BaseException | None = exc
    for _ in range(8):  # a cause chain is short; a cycle must not hang the build
        if seen is None:
            return None
        status = getattr(getattr(seen, "response", None), "status_code", None)
        if isinstance(status, int):
            return status
        seen = seen.__cause__ or seen.__context__
    return None


def _fetch_hf(loc: Location, cache: Path, report: Callable[[float, str], None]) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as exc:  # pragma: no cover - the engine extra installs it
        raise SourceError(f"{loc}: hf:// sources need huggingface_hub ({exc})", "BuildFailed") from exc
    report(0.0, f"downloading {loc}")
    token = os.environ.get("HF_TOKEN") or None
    try:
        path = snapshot_download(
            loc.path,
            revision=loc.revision,
            cache_dir=str(cache),
            allow_patterns=list(HF_PATTERNS),
            token=token,
        )
    except (HfHubHTTPError, LocalEntryNotFoundError) as exc:
        if isinstance(exc, LocalEntryNotFoundError) and http_status(exc) is None:
            raise SourceError(f"{loc}: cannot reach the Hugging Face Hub: {exc}", "FetchFailed") from exc
        raise hub_failure(loc, exc, token_sent=token is not None) from exc
    report(1.0, f"downloaded {loc}")
    return Path(path)


def require_s3(loc: Location) -> None:
    """Fail early (before a long build) where s3:// cannot be used."""
    import importlib.util

    if importlib.util.find_spec("boto3") is None:
        raise SourceError(
            f"{loc}: s3:// locations need boto3 (included in Kiln's engine images; `pip install boto3`)",
            "BuildFailed",
        )


def _s3_client(loc: Location) -> Any:
    require_s3(loc)
    import boto3

    return boto3.client("s3")


def _split_s3(loc: Location) -> tuple[str, str]:
    bucket, _, prefix = loc.path.partition("/")
    return bucket, prefix.strip("/")


def _fetch_s3(loc: Location, dest: Path, report: Callable[[float, str], None]) -> Path:
    client = _s3_client(loc)
    bucket, prefix = _split_s3(loc)
    keys: list[tuple[str, int]] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        keys += [(o["Key"], int(o["Size"])) for o in page.get("Contents", [])]
    if not keys:
        raise SourceError(f"{loc}: no objects under that prefix")
    total = sum(size for _, size in keys) or 1
    done = 0
    for key, size in keys:
        rel = key[len(prefix) + 1 :]
        target = dest / rel
        if not target.is_file() or target.stat().st_size != size:
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, key, str(target))
        done += size
        report(done / total, rel)
    return dest


def upload_s3(local: Path, uri: str, progress: Callable[[float, str], None] | None = None) -> None:
    """Upload an artifact directory to s3://bucket/prefix, manifest.json last (its presence marks it done)."""
    loc = parse_uri(uri)
    if loc.scheme != "s3":
        raise SourceError(f"{uri}: not an s3:// location", "InvalidOptions")
    client = _s3_client(loc)
    bucket, prefix = _split_s3(loc)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == MANIFEST_NAME)  # stable: the manifest goes last
    for i, f in enumerate(files):
        rel = f.relative_to(local).as_posix()
        client.upload_file(str(f), bucket, f"{prefix}/{rel}" if prefix else rel)
        if progress is not None:
            progress((i + 1) / len(files), f"uploaded {rel}")
