"""Engines on S3, against a real S3 server (MinIO from its pinned Go module) on loopback: build to
s3://, a second build reuses the cached engine, serving reads it with the keys from the
environment (a Secret in a pod), wrong keys, a missing bucket or region give a clear reason, an
interrupted upload leaves no half artifact, and virtual-host addressing reaches the same objects.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.engine, pytest.mark.slow]

torch = pytest.importorskip("torch")
boto3 = pytest.importorskip("boto3")

from kiln.local import s3server  # noqa: E402
from kiln_engine.backends.torch import resolve_artifact  # noqa: E402
from kiln_engine.build import source as src  # noqa: E402
from kiln_engine.build.manifest import MANIFEST_NAME, read_manifest  # noqa: E402
from kiln_engine.build.pipeline import BuildOptions, BuildOutcome, build_artifact  # noqa: E402
from kiln_engine.build.progress import Progress  # noqa: E402
from kiln_engine.testing.tiny import make_tiny_checkpoint  # noqa: E402

REGION = "eu-central-1"
DOMAIN = "s3.kiln.test"  # virtual-host style: <bucket>.s3.kiln.test (resolved in a mount namespace)
BUCKET = "kiln-cache"
S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3", "AWS_REGION")


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[s3server.S3Server]:
    with s3server.running(tmp_path_factory.mktemp("minio") / "data", region=REGION, domain=DOMAIN) as server:
        client(server).create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
        yield server


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "llama", seed=5)


@pytest.fixture
def s3_env(s3: s3server.S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """The cache Secret's keys in this process's environment, and a fresh download folder."""
    for name in ("AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "KILN_S3_ADDRESSING_STYLE", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    env = s3.credentials_env()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("KILN_WORK_DIR", str(tmp_path / "work"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where serving downloads to
    return env


def client(server: s3server.S3Server) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        region_name=server.region,
    )


def keys_under(server: s3server.S3Server, prefix: str) -> dict[str, int]:
    pages = client(server).get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/")
    return {o["Key"][len(prefix) + 1 :]: o["Size"] for page in pages for o in page.get("Contents", [])}


def build_to(checkpoint: Path | str, uri: str, **kw: Any) -> tuple[BuildOutcome, str]:
    buf = io.StringIO()
    opts = BuildOptions(model=str(checkpoint), output=uri, device="cpu", **kw)
    outcome = build_artifact(opts, Progress(out=buf, bar=False, min_interval_s=0))
    return outcome, buf.getvalue()


def test_build_to_s3_is_reused_by_a_second_build_and_served_from_it(
    s3: s3server.S3Server,
    s3_env: dict[str, str],
    checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    uri = f"s3://{BUCKET}/engines/tiny-reuse"
    first, _ = build_to(checkpoint, uri, max_batch_size=2, ttft_target_ms=5000, ttft_percentile=50,
                        capacity_time_budget_s=20)  # fmt: skip
    assert not first.reused
    stored = keys_under(s3, "engines/tiny-reuse")
    assert MANIFEST_NAME in stored and {f.path for f in first.manifest.files} == set(stored) - {MANIFEST_NAME}
    capacity = first.manifest.capacity
    assert capacity is not None and (capacity.ttft_percentile, capacity.ttft_target_ms) == (50, 5000)

    # A second deployment's build Job: a fresh pod (nothing staged locally) finds the engine on S3.
    shutil.rmtree(tmp_path / "work")
    second, log = build_to(checkpoint, uri, max_batch_size=2, ttft_target_ms=5000, ttft_percentile=50,
                           capacity_time_budget_s=20)  # fmt: skip
    assert second.reused and "already present" in log
    assert second.manifest_sha256 == first.manifest_sha256
    assert keys_under(s3, "engines/tiny-reuse") == stored  # nothing uploaded again

    # Another percentile measures another capacity: not the same build.
    third, _ = build_to(checkpoint, uri, max_batch_size=2, ttft_target_ms=5000, ttft_percentile=90,
                        capacity_time_budget_s=20)  # fmt: skip
    assert not third.reused and third.manifest.capacity is not None
    assert third.manifest.capacity.ttft_percentile == 90

    # Serving: the artifact is downloaded with the keys from the environment and verified.
    local = resolve_artifact(uri)
    assert read_manifest(local).created_at == third.manifest.created_at
    # A client signing for another region is told the bucket's region by the server and follows it.
    monkeypatch.setenv("AWS_REGION", "us-west-2")
    shutil.rmtree(tmp_path / "tmp")
    (tmp_path / "tmp").mkdir()
    assert read_manifest(resolve_artifact(uri)).created_at == third.manifest.created_at


def test_wrong_keys_fail_with_a_reason_and_never_show_the_secret(
    s3: s3server.S3Server, s3_env: dict[str, str], checkpoint: Path, tmp_path: Path
) -> None:
    wrong_secret = "definitely-not-the-secret-" + s3.secret_key[:6]
    result = tmp_path / "result.json"
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": wrong_secret}
    run = subprocess.run(
        [sys.executable, "-m", "kiln_engine.cli", "build", "--model", str(checkpoint),
         "--output", f"s3://{BUCKET}/engines/wrong-keys", "--device", "cpu", "--no-measure-capacity",
         "--no-progress-bar", "--result-file", str(result)],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode != 0
    outcome = json.loads(result.read_text())
    assert outcome["reason"] == "Unauthorized" and "SignatureDoesNotMatch" in outcome["message"]
    for text in (run.stdout, run.stderr, outcome["message"]):
        assert wrong_secret not in text and s3.secret_key not in text
    assert keys_under(s3, "engines/wrong-keys") == {}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}, "MissingCredentials"),
        ({"AWS_ACCESS_KEY_ID": "kiln-unknown-key"}, "Unauthorized"),
        ({"bucket": "no-such-bucket"}, "BucketNotFound"),
        ({"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:1"}, "EndpointUnreachable"),
        ({"KILN_S3_ADDRESSING_STYLE": "sideways"}, "InvalidOptions"),
    ],
)
def test_reading_an_engine_fails_with_a_clear_reason(
    s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, change: dict[str, str | None], reason: str
) -> None:
    bucket = change.pop("bucket", None) or BUCKET
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name, value in change.items():
        if value is None:
            monkeypatch.delenv(name)
        else:
            monkeypatch.setenv(name, value)
    with pytest.raises(src.SourceError) as raised:
        resolve_artifact(f"s3://{bucket}/engines/anything")
    assert raised.value.reason == reason
    assert s3_env["AWS_SECRET_ACCESS_KEY"] not in str(raised.value)


def test_an_interrupted_upload_leaves_no_half_artifact(
    s3: s3server.S3Server, s3_env: dict[str, str], checkpoint: Path, tmp_path: Path
) -> None:
    uri = f"s3://{BUCKET}/engines/interrupted"
    built, _ = build_to(checkpoint, uri, measure_capacity=False)
    assert MANIFEST_NAME in keys_under(s3, "engines/interrupted")
    resolve_artifact(uri)  # a serving pod holds a downloaded copy of the old artifact
    rebuilt = tmp_path / "rebuilt"
    shutil.copytree(built.path, rebuilt)
    (rebuilt / "extra.bin").write_bytes(b"x" * 1024)  # a file the first artifact lacks

    def stop_after_first_file(fraction: float, message: str) -> None:
        raise KeyboardInterrupt("pod killed mid-upload")

    with pytest.raises(KeyboardInterrupt):
        src.upload_s3(rebuilt, uri, stop_after_first_file)
    stored = keys_under(s3, "engines/interrupted")
    assert MANIFEST_NAME not in stored and stored  # files went up, the manifest (old or new) did not
    with pytest.raises(src.SourceError, match="not a finished Kiln artifact"):
        resolve_artifact(uri)
    # The next build finds no finished artifact there and publishes a whole one.
    again, _ = build_to(checkpoint, uri, measure_capacity=False)
    assert not again.reused and MANIFEST_NAME in keys_under(s3, "engines/interrupted")
    assert read_manifest(resolve_artifact(uri)).created_at == again.manifest.created_at


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
def test_virtual_host_addressing_reaches_the_same_objects(
    s3: s3server.S3Server, s3_env: dict[str, str], checkpoint: Path, tmp_path: Path
) -> None:
    """A download with KILN_S3_ADDRESSING_STYLE=virtual asks <bucket>.s3.kiln.test, which only a
    private /etc/hosts (in a mount namespace of the child) resolves; without the bucket's name there
    it cannot connect, which shows the bucket travelled in the host name and not the path."""
    uri = f"s3://{BUCKET}/engines/virtual"
    build_to(checkpoint, uri, measure_capacity=False)
    port = s3.endpoint.rsplit(":", 1)[1]
    code = (
        "import sys; from pathlib import Path; from kiln_engine.build.source import SourceError, fetch\n"
        f"try: print(fetch({uri!r}, Path(sys.argv[1])))\n"
        "except SourceError as e: print(e.reason); sys.exit(3)"
    )
    # No name server answers in the namespace: a name outside its hosts file fails at once.
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions attempts:1 timeout:1\n")

    def fetch_with_hosts(names: str) -> subprocess.CompletedProcess[str]:
        hosts = tmp_path / f"hosts-{len(names)}"
        hosts.write_text(f"127.0.0.1 localhost {names}\n")
        env = {**os.environ, "KILN_S3_ADDRESSING_STYLE": "virtual",
               "AWS_ENDPOINT_URL_S3": f"http://{DOMAIN}:{port}"}  # fmt: skip
        script = f'mount --bind {hosts} /etc/hosts && mount --bind {resolv} /etc/resolv.conf && exec "$@"'
        command = ["unshare", "--mount", "sh", "-c", script, "sh", sys.executable, "-c", code]
        return subprocess.run(
            [*command, str(tmp_path / "dl")],
            env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip

    served = fetch_with_hosts(f"{DOMAIN} {BUCKET}.{DOMAIN}")
    assert served.returncode == 0, served.stderr[-2000:]
    assert (Path(served.stdout.strip().splitlines()[-1]) / MANIFEST_NAME).is_file()
    unresolved = fetch_with_hosts(DOMAIN)
    assert unresolved.returncode == 3 and unresolved.stdout.strip().endswith("EndpointUnreachable")
