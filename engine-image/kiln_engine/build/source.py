"""Where checkpoints and artifacts live: parsing `pvc://`, `hf://`, `s3://` URIs and moving files.

* a plain path (or `file:///path`): used in place;
* `pvc://claim/path`: the claim mounted at `$KILN_PVC_ROOT/claim` (default root `/mnt/pvc`);
* `hf://org/name[@revision]`: downloaded with `huggingface_hub.snapshot_download` (token `$HF_TOKEN`);
* `s3://bucket/prefix`: downloaded or uploaded with boto3 (optional; a clear error without it), on any
  S3-compatible server: keys `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, endpoint
  `AWS_ENDPOINT_URL_S3` (or `AWS_ENDPOINT_URL`), region `AWS_REGION` (or `AWS_DEFAULT_REGION`),
  `KILN_S3_ADDRESSING_STYLE` path | virtual | auto, all from the environment (a Secret in a pod).

An artifact on S3 is read through its manifest: only the files it lists are downloaded, so objects
left by an interrupted upload are never mistaken for a finished artifact. Uploads remove the old
manifest first and write the new one last. Parsing and error mapping are pure; `fetch`, `upload_s3`
and `read_s3_manifest` are the I/O edges.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln_engine.build.manifest import MANIFEST_NAME, Manifest

DEFAULT_PVC_ROOT = "/mnt/pvc"
SCHEMES = ("file", "pvc", "hf", "s3")
# What a Hugging Face snapshot needs for building: configs, safetensors weights, tokenizer files.
HF_PATTERNS = ("*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.tiktoken")
ADDRESSING_STYLES = ("auto", "path", "virtual")
# S3 error codes that mean the keys are wrong or lack access (AWS and MinIO spell them the same).
S3_AUTH_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken", "403"}
)
S3_REGION_CODES = frozenset(
    {"AuthorizationHeaderMalformed", "PermanentRedirect", "IllegalLocationConstraintException"}
)


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


@dataclass(frozen=True)
class S3Settings:
    """How to reach the S3 server: endpoint (None: AWS), region, addressing style."""

    endpoint: str | None
    region: str | None
    addressing_style: str


def s3_settings(env: Mapping[str, str]) -> S3Settings:
    """The S3 settings in an environment; raises SourceError (InvalidOptions) for a malformed one."""
    style = env.get("KILN_S3_ADDRESSING_STYLE", "").strip().lower() or "auto"
    if style not in ADDRESSING_STYLES:
        raise SourceError(
            f"KILN_S3_ADDRESSING_STYLE={style!r}: use one of {', '.join(ADDRESSING_STYLES)}", "InvalidOptions"
        )
    endpoint = (env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or "").strip() or None
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        raise SourceError(
            f"S3 endpoint {endpoint!r} (AWS_ENDPOINT_URL_S3): expected http://host[:port] or https://…",
            "InvalidOptions",
        )
    region = (env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "").strip() or None
    return S3Settings(endpoint, region, style)


def s3_failure(loc: Location | str, exc: BaseException) -> SourceError:
    """The SourceError for a failed S3 call, from botocore's error class and the server's error code.

    Messages name the location, endpoint and code, never the request or the keys.
    """
    name = type(exc).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return SourceError(
            f"{loc}: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (in a pod, "
            "through the Secret named in spec.build.cacheCredentialsSecret or spec.model.credentialsSecret)",
            "MissingCredentials",
        )
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError"):
        return SourceError(f"{loc}: cannot reach the S3 endpoint ({name})", "EndpointUnreachable")
    error = getattr(exc, "response", {}).get("Error", {}) if hasattr(exc, "response") else {}
    code = str(error.get("Code", "")) or name
    if code == "NoSuchBucket":
        return SourceError(f"{loc}: bucket {_bucket(loc)!r} does not exist on the server", "BucketNotFound")
    if code in S3_AUTH_CODES:
        return SourceError(
            f"{loc}: the S3 server rejected the credentials ({code}): the access key is unknown, the "
            "secret key does not match, or the key has no access to this bucket",
            "Unauthorized",
        )
    if code in S3_REGION_CODES:
        # The server's message names the region it expects; it carries nothing of the request.
        return SourceError(f"{loc}: wrong S3 region ({code}): {error.get('Message', '')}", "WrongRegion")
    return SourceError(f"{loc}: S3 request failed ({code})", "FetchFailed")


def _bucket(loc: Location | str) -> str:
    path = loc.path if isinstance(loc, Location) else str(loc).partition("://")[2]
    return path.split("/", 1)[0]


@contextmanager
def s3_errors(loc: Location | str) -> Iterator[None]:
    """Turn botocore's exceptions inside the block into SourceErrors with a reason."""
    try:
        yield
    except SourceError:
        raise
    except Exception as exc:
        if type(exc).__module__.split(".")[0] not in ("botocore", "boto3", "s3transfer"):
            raise
        raise s3_failure(loc, exc) from None


def _s3_client(loc: Location) -> Any:
    require_s3(loc)
    import boto3
    from botocore.config import Config

    settings = s3_settings(os.environ)
    config = Config(s3={"addressing_style": settings.addressing_style}, retries={"max_attempts": 3})
    # A session of its own: boto3's default session keeps the first credentials it found.
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=settings.endpoint, region_name=settings.region, config=config)


def _split_s3(loc: Location) -> tuple[str, str]:
    bucket, _, prefix = loc.path.partition("/")
    return bucket, prefix.strip("/")


def _key(prefix: str, rel: str) -> str:
    """The object key of `rel` under `prefix` (`_key(prefix, "")` is the prefix as a folder)."""
    return f"{prefix}/{rel}" if prefix else rel


def read_s3_manifest(uri: str) -> tuple[Manifest, str] | None:
    """The manifest of the artifact at an s3:// location and its bytes' SHA-256, or None where there
    is none (yet)."""
    loc = parse_uri(uri)
    client = _s3_client(loc)
    bucket, prefix = _split_s3(loc)
    with s3_errors(loc):
        try:
            body = client.get_object(Bucket=bucket, Key=_key(prefix, MANIFEST_NAME))["Body"].read()
        except client.exceptions.NoSuchKey:
            return None
    try:
        return Manifest.model_validate(json.loads(body)), hashlib.sha256(body).hexdigest()
    except ValueError as exc:
        raise SourceError(f"{loc}: {MANIFEST_NAME} is not a Kiln manifest: {exc}", "InvalidArtifact") from exc


def s3_objects(uri: str) -> dict[str, tuple[int, str]]:
    """Every object under an s3:// location: path relative to it -> (size in bytes, ETag)."""
    loc = parse_uri(uri)
    client = _s3_client(loc)
    bucket, prefix = _split_s3(loc)
    found: dict[str, tuple[int, str]] = {}
    with s3_errors(loc):
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=_key(prefix, ""))
        for page in pages:
            for o in page.get("Contents", []):
                found[o["Key"][len(_key(prefix, "")) :]] = (int(o["Size"]), str(o.get("ETag", "")))
    return found


def _fetch_s3(loc: Location, dest: Path, report: Callable[[float, str], None]) -> Path:
    """Download a checkpoint (every object under the prefix) or an artifact (only what its manifest
    lists; the manifest last, and local files it does not list removed, so `dest` verifies)."""
    client = _s3_client(loc)
    bucket, prefix = _split_s3(loc)
    found = read_s3_manifest(str(loc))
    manifest = found[0] if found is not None else None
    # A manifest left from an earlier download must not vouch for what is downloaded now.
    (dest / MANIFEST_NAME).unlink(missing_ok=True)
    if manifest is not None:
        keys = [(f.path, f.size) for f in manifest.files]
    else:
        keys = [(rel, size) for rel, (size, _) in s3_objects(str(loc)).items()]
    if not keys:
        raise SourceError(f"{loc}: no objects under that prefix")
    total = sum(size for _, size in keys) or 1
    done = 0
    with s3_errors(loc):
        for rel, size in keys:
            target = dest / rel
            if not target.is_file() or target.stat().st_size != size:
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_name(f".{target.name}.partial")
                client.download_file(bucket, _key(prefix, rel), str(partial))
                partial.replace(target)
            done += size
            report(done / total, rel)
        if manifest is not None:
            listed = {rel for rel, _ in keys}
            for stale in [p for p in dest.rglob("*") if p.is_file()]:
                if stale.relative_to(dest).as_posix() not in listed:
                    stale.unlink()
            client.download_file(bucket, _key(prefix, MANIFEST_NAME), str(dest / MANIFEST_NAME))
    return dest


def upload_s3(local: Path, uri: str, progress: Callable[[float, str], None] | None = None) -> None:
    """Upload an artifact directory to s3://bucket/prefix: the old manifest goes first, the new one
    last, so at every moment the location holds either no manifest or one whose files are all there."""
    loc = parse_uri(uri)
    if loc.scheme != "s3":
        raise SourceError(f"{uri}: not an s3:// location", "InvalidOptions")
    client = _s3_client(loc)
    bucket, prefix = _split_s3(loc)
    files = sorted(p for p in local.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    with s3_errors(loc):
        client.list_objects_v2(Bucket=bucket, Prefix=_key(prefix, ""), MaxKeys=1)  # bucket, keys, region
        client.delete_object(Bucket=bucket, Key=_key(prefix, MANIFEST_NAME))
        for i, f in enumerate(files):
            rel = f.relative_to(local).as_posix()
            client.upload_file(str(f), bucket, _key(prefix, rel))
            if progress is not None:
                progress((i + 1) / (len(files) + 1), f"uploaded {rel}")
        client.upload_file(str(local / MANIFEST_NAME), bucket, _key(prefix, MANIFEST_NAME))
    if progress is not None:
        progress(1.0, f"uploaded {MANIFEST_NAME}")
