"""The `kiln-engine` command line: help, argument errors, and the TensorRT-LLM backend's message
where TensorRT-LLM is not installed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from kiln_engine.backends import tensorrt_llm as trt
from kiln_engine.cli import main, read_api_key

pytestmark = pytest.mark.engine


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kiln_engine.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_help_lists_the_commands() -> None:
    out = CliRunner().invoke(main, ["--help"])
    assert out.exit_code == 0
    for cmd in ("serve", "build", "verify"):
        assert cmd in out.output
    build_help = CliRunner().invoke(main, ["build", "--help"]).output
    for flag in ("--quantization", "--tp", "--pp", "--kv-cache-dtype", "--max-batch-size", "--max-seq-len",
                 "--gpu-arch", "--measure-capacity", "int4-gptq"):  # fmt: skip
        assert flag in build_help


def test_serve_needs_exactly_one_source() -> None:
    out = CliRunner().invoke(main, ["serve"])
    assert out.exit_code == 2 and "exactly one of --artifact or --model" in out.output
    out = CliRunner().invoke(main, ["serve", "--artifact", "a", "--model", "b"])
    assert out.exit_code == 2


def test_serve_refuses_an_unfinished_artifact(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    proc = run("serve", "--artifact", str(tmp_path))
    assert proc.returncode == 1 and "not a finished Kiln artifact" in proc.stderr


def test_torch_backend_builds_an_fp8_kv_cache(tmp_path: Path) -> None:
    out = CliRunner().invoke(main, ["build", "--model", str(tmp_path), "--output", str(tmp_path / "o"),
                                    "--kv-cache-dtype", "fp8", "--no-progress-bar"])  # fmt: skip
    # The options pass; the build fails later, on the empty checkpoint directory.
    assert out.exit_code == 1 and "kv cache" not in out.output.lower(), out.output


@pytest.mark.skipif(trt.available(), reason="TensorRT-LLM is installed here")
def test_tensorrt_llm_backend_says_how_to_get_it(tmp_path: Path) -> None:
    proc = run("serve", "--backend", "tensorrt-llm", "--model", str(tmp_path))
    assert proc.returncode == 3
    assert "TensorRT-LLM is not installed" in proc.stderr and "Dockerfile.tensorrt-llm" in proc.stderr
    proc = run(
        "build", "--backend", "tensorrt-llm", "--model", str(tmp_path), "--output", str(tmp_path / "o")
    )
    assert proc.returncode == 1 and "TensorRT-LLM is not installed" in proc.stderr
    assert '"step":"failed"' in proc.stdout
    assert not (tmp_path / "o").exists()


def test_api_key_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KILN_API_KEY", raising=False)
    assert read_api_key(None) is None
    monkeypatch.setenv("KILN_API_KEY", "from-env")
    assert read_api_key(None) == "from-env"
    key = tmp_path / "key"
    key.write_text("from-file\n")
    assert read_api_key(str(key)) == "from-file"
    (tmp_path / "empty").write_text("")
    with pytest.raises(Exception, match="empty"):
        read_api_key(str(tmp_path / "empty"))
