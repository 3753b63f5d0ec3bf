"""Pure parts of the build: URIs, progress lines, manifest checksums, metrics deltas."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from kiln_engine.build import source as src
from kiln_engine.build.manifest import (
    Manifest,
    RuntimeInfo,
    VerificationError,
    config_hash,
    file_entries,
    verify_artifact,
    write_manifest,
)
from kiln_engine.build.progress import Progress, format_line, parse_line
from kiln_engine.interface import EngineStats
from kiln_engine.server.metrics import ServerMetrics


def test_parse_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    assert src.parse_uri("/data/m") == src.Location("file", "/data/m")
    assert src.parse_uri("hf://meta-llama/Llama-3.1-8B@abc123") == src.Location(
        "hf", "meta-llama/Llama-3.1-8B", "abc123"
    )
    assert src.parse_uri("hf://org/name").revision is None
    assert src.parse_uri("s3://bucket/a/b") == src.Location("s3", "bucket/a/b")
    monkeypatch.setenv("KILN_PVC_ROOT", "/mnt/x")
    assert src.local_path(src.parse_uri("pvc://cache/engines/k1")) == Path("/mnt/x/cache/engines/k1")
    monkeypatch.delenv("KILN_PVC_ROOT")
    assert src.local_path(src.parse_uri("pvc://cache/e")) == Path("/mnt/pvc/cache/e")
    for bad in ("hf://justname", "ftp://x/y", "s3:///nobucket"):
        with pytest.raises(src.SourceError):
            src.parse_uri(bad)


def test_s3_without_boto3_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # an image without boto3 (the dev extra has it)
    with pytest.raises(src.SourceError, match="need boto3"):
        src.fetch("s3://bucket/model", tmp_path)


def test_progress_lines_are_machine_readable() -> None:
    line = format_line("convert", 42.123, "layer 3", step_percent=50.0)
    assert line.startswith("KILN_PROGRESS {")
    assert parse_line("2026-01-01 " + line) == {"step": "convert", "percent": 42.1, "message": "layer 3",
                                                "step_percent": 50.0}  # fmt: skip
    assert parse_line("KILN_PROGRESS not json") is None and parse_line("hello") is None
    buf = io.StringIO()
    prog = Progress(out=buf, bar=False, min_interval_s=0)
    prog.update("fetch", 1.0, "ok")
    prog.update("convert", 0.5, "half")
    prog.update("load", 1.0, "late step never moves percent backwards")
    prog.done()
    payloads = [parse_line(x) for x in buf.getvalue().splitlines()]
    percents = [pl["percent"] for pl in payloads if pl]
    assert percents == sorted(percents) and percents[-1] == 100.0


def make_manifest(root: Path) -> Manifest:
    return Manifest(
        runtime=RuntimeInfo(version="0"), gpu_arch="cpu", source="x", config_hash=config_hash({"a": 1}),
        quantization="none", files=file_entries(root), created_at="now",
    )  # fmt: skip


def test_manifest_checksums(tmp_path: Path) -> None:
    (tmp_path / "rank-0").mkdir()
    (tmp_path / "rank-0" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "config.json").write_text("{}")
    write_manifest(tmp_path, make_manifest(tmp_path))
    m = verify_artifact(tmp_path)
    assert [f.path for f in m.files] == ["config.json", "rank-0/model.safetensors"]
    (tmp_path / "config.json").write_text("{ }")
    with pytest.raises(VerificationError, match=r"config\.json: size"):
        verify_artifact(tmp_path)
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(VerificationError, match=r"config\.json: sha256"):
        verify_artifact(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(VerificationError, match="not a finished artifact"):
        verify_artifact(tmp_path)


def test_config_hash_ignores_key_order() -> None:
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash(json.loads('{"b": [1, 2], "a": 1}'))
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_metrics_counters_follow_engine_totals() -> None:
    m = ServerMetrics("m")
    m.observe_stats(EngineStats(3, 2, 10, 4, preemptions_total=2, prefix_cache_hit_tokens_total=32))
    m.observe_stats(EngineStats(0, 1, 10, 1, preemptions_total=5, prefix_cache_hit_tokens_total=32))
    text = m.render().decode()
    assert 'kiln_engine_queue_depth{model="m"} 0.0' in text
    assert 'kiln_engine_kv_cache_usage_ratio{model="m"} 0.1' in text
    assert 'kiln_engine_preemptions_total{model="m"} 5.0' in text
    assert 'kiln_engine_prefix_cache_hit_tokens_total{model="m"} 32.0' in text
    m.request_finished("aborted")
    assert 'kiln_engine_requests_total{model="m",status="aborted"} 1.0' in m.render().decode()
