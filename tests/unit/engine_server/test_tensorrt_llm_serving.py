"""`kiln-engine serve --backend tensorrt-llm`: the artifact is resolved and verified like a torch one
(path, pvc://, s3://; checksums), and the proxy maps TensorRT-LLM 1.0's iteration stats onto Kiln's
metrics. TensorRT-LLM itself is replaced at its edge (`trt.serve`), so this runs anywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from kiln_engine import cli
from kiln_engine.backends import tensorrt_llm as trt
from kiln_engine.build.manifest import Manifest, RuntimeInfo, file_entries, write_manifest
from kiln_engine.interface import EngineStats
from kiln_engine.server.proxy import idle_stats, stats_from_iteration_json


def make_artifact(root: Path, backend: str = "tensorrt-llm", tp: int = 2) -> Path:
    (root / "engine").mkdir(parents=True)
    (root / "engine" / "rank0.engine").write_bytes(b"engine bytes")
    (root / "config.json").write_text("{}")
    manifest = Manifest(
        runtime=RuntimeInfo(version="test", backend=backend), backend=backend, gpu_arch="sm90", source="s",
        config_hash="h", quantization="fp8", tensor_parallel_size=tp, files=file_entries(root), created_at="",
    )  # fmt: skip
    write_manifest(root, manifest)
    return root


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[dict[str, Any]]:
    """What `trt.serve` would have been handed (TensorRT-LLM is not installed here)."""
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(trt, "available", lambda: True)
    monkeypatch.setattr(
        trt, "serve", lambda model, opts, **kw: calls.append({"model": model, "opts": opts, **kw})
    )
    monkeypatch.setenv("KILN_PVC_ROOT", str(tmp_path / "pvc"))
    return calls


def serve(*args: str) -> Any:
    return CliRunner().invoke(cli.main, ["serve", "--backend", "tensorrt-llm", *args])


def test_a_pvc_artifact_is_resolved_and_served_with_its_parallelism(
    served: list[dict[str, Any]], tmp_path: Path
) -> None:
    art = make_artifact(tmp_path / "pvc" / "engines" / "k1")
    out = serve("--artifact", "pvc://engines/k1", "--served-model-name", "m")
    assert out.exit_code == 0, out.output
    [call] = served
    assert call["model"] == str(art / "engine") and call["tokenizer"] == str(art)
    assert call["engine_backend"] == "tensorrt" and call["opts"].tensor_parallel_size == 2


def test_an_altered_artifact_is_refused_before_serving(served: list[dict[str, Any]], tmp_path: Path) -> None:
    art = make_artifact(tmp_path / "pvc" / "engines" / "k1")
    (art / "engine" / "rank0.engine").write_bytes(b"engine bytez")
    out = serve("--artifact", "pvc://engines/k1")
    assert out.exit_code == 1 and "does not match its manifest" in out.output and not served
    assert serve("--artifact", "pvc://engines/k1", "--no-verify").exit_code == 0 and len(served) == 1


def test_a_torch_artifact_or_an_unfinished_one_is_refused(
    served: list[dict[str, Any]], tmp_path: Path
) -> None:
    make_artifact(tmp_path / "torch-art", backend="torch")
    out = serve("--artifact", str(tmp_path / "torch-art"))
    assert out.exit_code == 1 and "built for --backend torch" in out.output
    (tmp_path / "half").mkdir()
    out = serve("--artifact", str(tmp_path / "half"))
    assert out.exit_code == 1 and "manifest.json" in out.output and not served


def iteration(queued: int, active: int, used: int, reused: int) -> dict[str, Any]:
    """One record of 1.0's `LLM.get_stats()` as trtllm-serve's /metrics returns it (abridged)."""
    return {
        "iter": 7, "iterLatencyMS": 12.5, "numActiveRequests": active, "numQueuedRequests": queued,
        "numCompletedRequests": 0, "maxNumActiveRequests": 64, "gpuMemUsage": 1 << 30,
        "kvCacheStats": {"maxNumBlocks": 400, "freeNumBlocks": 400 - used, "usedNumBlocks": used,
                         "tokensPerBlock": 32, "allocTotalBlocks": used + reused, "allocNewBlocks": used,
                         "reusedBlocks": reused, "missedBlocks": used, "cacheHitRate": 0.5},
        "inflightBatchingStats": {"numScheduledRequests": active, "numContextRequests": 1,
                                  "numGenRequests": active - 1, "numPausedRequests": 0, "numCtxTokens": 100,
                                  "microBatchId": 0, "avgNumDecodedTokensPerIter": 1.0},
    }  # fmt: skip


def test_iteration_stats_map_onto_the_engine_metrics() -> None:
    stats = stats_from_iteration_json([iteration(0, 1, 10, 0), iteration(3, 5, 100, 4)])
    assert stats == EngineStats(waiting=3, running=5, kv_blocks_total=400, kv_blocks_used=100,
                                prefix_cache_hit_tokens_total=4 * 32)  # fmt: skip


def test_a_read_without_new_iterations_keeps_the_cache_and_totals() -> None:
    last = stats_from_iteration_json([iteration(3, 5, 100, 4)])
    assert last is not None
    idle = idle_stats(last)
    assert (idle.waiting, idle.running) == (0, 0)
    assert (idle.kv_blocks_used, idle.prefix_cache_hit_tokens_total) == (100, 128)
