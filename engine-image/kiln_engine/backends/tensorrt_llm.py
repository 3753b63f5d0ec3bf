"""The TensorRT-LLM backend: our build/serve options mapped onto TensorRT-LLM's (pure functions), and
the thin runners that hand them to its LLM API (build) and `trtllm-serve` (serve).

Pinned to release 1.0 (engine-image/Dockerfile.tensorrt-llm). Names follow that release's own:
`QuantAlgo` members (FP8, W8A16, W4A16_AWQ, W4A16_GPTQ); the TensorRT engine flow's LLM, which 1.0
exports as `tensorrt_llm._tensorrt_engine.LLM` (plain `tensorrt_llm.LLM` is the PyTorch flow, which
cannot build or save an engine), and its arguments (`tensor_parallel_size`, `pipeline_parallel_size`,
`quant_config`, `build_config`, `kv_cache_config.enable_block_reuse` for prefix caching,
`enable_chunked_prefill`, `iter_stats_max_iterations`); the PyTorch flow's `enable_iter_perf_stats`;
`trtllm-build` flags (`--max_batch_size`, `--max_seq_len`, `--max_num_tokens`,
`--use_paged_context_fmha`) and `trtllm-serve` flags (`--backend tensorrt|pytorch`, `--tp_size`,
`--pp_size`, `--kv_cache_free_gpu_memory_fraction`, `--extra_llm_api_options`).
tests/unit/engine_server/test_tensorrt_llm_api.py checks every such name against the 1.0 surface in
tests/unit/engine_server/trtllm_api_surface.json. Where tensorrt_llm is not importable, everything that
would run it raises TensorRTLLMUnavailable with how to get the image.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

IMAGE_HINT = (
    "TensorRT-LLM is not installed here. Use Kiln's TensorRT-LLM engine image "
    "(built from engine-image/Dockerfile.tensorrt-llm on nvcr.io/nvidia/tensorrt-llm/release), "
    "or install it on a CUDA host with `pip install tensorrt-llm`; or use --backend torch."
)

# Our --quantization -> TensorRT-LLM QuantAlgo (None: no weight quantization, maybe a dtype cast).
QUANT_ALGO: dict[str, str | None] = {
    "none": None,
    "bf16": None,
    "fp16": None,
    "fp8": "FP8",
    "int8-weight": "W8A16",
    "int4-awq": "W4A16_AWQ",
    "int4-gptq": "W4A16_GPTQ",
}
# Our --quantization -> LLM API `dtype` (the activation/weight type of unquantized parts).
DTYPE: dict[str, str] = {"bf16": "bfloat16", "fp16": "float16"}
# Iterations of stats the engine keeps between two reads of trtllm-serve's /metrics (it drains them).
STATS_ITERATIONS = 1000
# Our --kv-cache-dtype -> (KvCacheConfig.dtype, QuantConfig.kv_cache_quant_algo).
KV_CACHE: dict[str, tuple[str, str | None]] = {
    "auto": ("auto", None),
    "bf16": ("auto", None),  # the KV cache follows the model dtype
    "fp16": ("auto", None),
    "fp8": ("fp8", "FP8"),
}


class TensorRTLLMUnavailable(RuntimeError):
    """tensorrt_llm cannot be imported in this environment."""


@dataclass(frozen=True)
class TrtOptions:
    """The subset of our build/serve options TensorRT-LLM takes."""

    quantization: str = "none"
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    max_batch_size: int = 64
    max_seq_len: int | None = None
    max_num_tokens: int = 2048
    kv_cache_dtype: str = "auto"
    prefix_caching: bool = True
    chunked_prefill: bool = True
    kv_cache_free_gpu_memory_fraction: float = 0.9

    def __post_init__(self) -> None:
        if self.quantization not in QUANT_ALGO:
            raise ValueError(
                f"unknown quantization {self.quantization!r}; choose from {', '.join(QUANT_ALGO)}"
            )
        if self.kv_cache_dtype not in KV_CACHE:
            raise ValueError(
                f"unknown kv cache dtype {self.kv_cache_dtype!r}; choose from {', '.join(KV_CACHE)}"
            )
        if not 0.0 < self.kv_cache_free_gpu_memory_fraction <= 1.0:
            raise ValueError("kv_cache_free_gpu_memory_fraction must be in (0, 1]")


def available() -> bool:
    return importlib.util.find_spec("tensorrt_llm") is not None


def require() -> None:
    if not available():
        raise TensorRTLLMUnavailable(IMAGE_HINT)


def quant_config(opts: TrtOptions) -> dict[str, Any] | None:
    """`QuantConfig` fields for the LLM API, or None when nothing is quantized."""
    algo = QUANT_ALGO[opts.quantization]
    kv_algo = KV_CACHE[opts.kv_cache_dtype][1]
    if algo is None and kv_algo is None:
        return None
    out: dict[str, Any] = {}
    if algo is not None:
        out["quant_algo"] = algo
    if kv_algo is not None:
        out["kv_cache_quant_algo"] = kv_algo
    return out


def kv_cache_config(opts: TrtOptions) -> dict[str, Any]:
    """`KvCacheConfig` fields: block reuse is TensorRT-LLM's prefix caching."""
    return {
        "enable_block_reuse": opts.prefix_caching,
        "free_gpu_memory_fraction": opts.kv_cache_free_gpu_memory_fraction,
        "dtype": KV_CACHE[opts.kv_cache_dtype][0],
    }


def build_config(opts: TrtOptions) -> dict[str, Any]:
    """`BuildConfig` fields (engine shape limits)."""
    out: dict[str, Any] = {"max_batch_size": opts.max_batch_size, "max_num_tokens": opts.max_num_tokens}
    if opts.max_seq_len is not None:
        out["max_seq_len"] = opts.max_seq_len
    return out


def llm_api_kwargs(checkpoint: str, opts: TrtOptions) -> dict[str, Any]:
    """Keyword arguments of the TensorRT flow's LLM (`tensorrt_llm._tensorrt_engine.LLM`) for a build."""
    kwargs: dict[str, Any] = {
        "model": checkpoint,
        "tensor_parallel_size": opts.tensor_parallel_size,
        "pipeline_parallel_size": opts.pipeline_parallel_size,
        "dtype": DTYPE.get(opts.quantization, "auto"),
        "build_config": build_config(opts),
        "kv_cache_config": kv_cache_config(opts),
        "enable_chunked_prefill": opts.chunked_prefill,
    }
    qc = quant_config(opts)
    if qc is not None:
        kwargs["quant_config"] = qc
    return kwargs


def trtllm_build_args(checkpoint_dir: str, output_dir: str, opts: TrtOptions) -> list[str]:
    """`trtllm-build` argv for a TensorRT-LLM checkpoint (already quantized/sharded by its converter)."""
    args = [
        "trtllm-build",
        "--checkpoint_dir", checkpoint_dir,
        "--output_dir", output_dir,
        "--max_batch_size", str(opts.max_batch_size),
        "--max_num_tokens", str(opts.max_num_tokens),
        "--gemm_plugin", "auto",
        # paged context attention is what KV-cache block reuse and chunked context need
        "--use_paged_context_fmha", "enable" if (opts.prefix_caching or opts.chunked_prefill) else "disable",
        "--workers", str(opts.tensor_parallel_size * opts.pipeline_parallel_size),
    ]  # fmt: skip
    if opts.max_seq_len is not None:
        args += ["--max_seq_len", str(opts.max_seq_len)]
    if opts.kv_cache_dtype == "fp8" and QUANT_ALGO[opts.quantization] == "FP8":
        args += ["--use_fp8_context_fmha", "enable"]
    return args


def quantize_script_args(model_dir: str, output_dir: str, opts: TrtOptions) -> list[str]:
    """`examples/quantization/quantize.py` argv producing the TensorRT-LLM checkpoint trtllm-build reads."""
    qformat = {
        "fp8": "fp8",
        "int8-weight": "int8_wo",
        "int4-awq": "int4_awq",
        "int4-gptq": "int4_gptq",
    }.get(opts.quantization, "full_prec")
    args = [
        "python3", "quantize.py",
        "--model_dir", model_dir,
        "--output_dir", output_dir,
        "--dtype", DTYPE.get(opts.quantization, "bfloat16"),
        "--qformat", qformat,
        "--tp_size", str(opts.tensor_parallel_size),
        "--pp_size", str(opts.pipeline_parallel_size),
    ]  # fmt: skip
    if opts.kv_cache_dtype == "fp8":
        args += ["--kv_cache_dtype", "fp8"]
    return args


def extra_llm_api_options(opts: TrtOptions, engine_backend: str = "tensorrt") -> dict[str, Any]:
    """The YAML `trtllm-serve --extra_llm_api_options` reads: what its flags do not cover.

    It also switches on the iteration stats trtllm-serve's /metrics returns (queue, running, KV cache),
    which the proxy exports: the PyTorch flow records none unless `enable_iter_perf_stats` is set, a
    field the TensorRT flow's arguments do not have (there the executor keeps them by itself).
    """
    out: dict[str, Any] = {
        "kv_cache_config": {
            "enable_block_reuse": opts.prefix_caching,
            "dtype": KV_CACHE[opts.kv_cache_dtype][0],
        },
        "enable_chunked_prefill": opts.chunked_prefill,
        "iter_stats_max_iterations": STATS_ITERATIONS,
    }
    if engine_backend == "pytorch":
        out["enable_iter_perf_stats"] = True
    return out


def trtllm_serve_args(
    model: str,
    opts: TrtOptions,
    *,
    host: str,
    port: int,
    extra_options_file: str,
    tokenizer: str | None = None,
    engine_backend: str = "tensorrt",
) -> list[str]:
    """`trtllm-serve` argv; `engine_backend` is `tensorrt` for a built engine, `pytorch` for a checkpoint."""
    args = [
        "trtllm-serve", model,
        "--host", host,
        "--port", str(port),
        "--backend", engine_backend,
        "--max_batch_size", str(opts.max_batch_size),
        "--max_num_tokens", str(opts.max_num_tokens),
        "--tp_size", str(opts.tensor_parallel_size),
        "--pp_size", str(opts.pipeline_parallel_size),
        "--kv_cache_free_gpu_memory_fraction", str(opts.kv_cache_free_gpu_memory_fraction),
        "--extra_llm_api_options", extra_options_file,
    ]  # fmt: skip
    if opts.max_seq_len is not None:
        args += ["--max_seq_len", str(opts.max_seq_len)]
    if tokenizer is not None:
        args += ["--tokenizer", tokenizer]
    return args


# ---------------------------------------------------------------------- runners (need tensorrt_llm)


def build_engine(checkpoint: str, output_dir: Path, opts: TrtOptions) -> None:
    """Quantize and build a TensorRT engine with the LLM API, saved to `output_dir`."""
    require()
    # 1.0's `tensorrt_llm.LLM` is the PyTorch flow: it builds no engine and has no save().
    from tensorrt_llm._tensorrt_engine import LLM  # type: ignore[import-not-found,unused-ignore]
    from tensorrt_llm.llmapi import (  # type: ignore[import-not-found,unused-ignore]
        BuildConfig,
        KvCacheConfig,
        QuantAlgo,
        QuantConfig,
    )

    kwargs = llm_api_kwargs(checkpoint, opts)
    kwargs["build_config"] = BuildConfig(**kwargs["build_config"])
    kwargs["kv_cache_config"] = KvCacheConfig(**kwargs["kv_cache_config"])
    if "quant_config" in kwargs:
        kwargs["quant_config"] = QuantConfig(**{k: QuantAlgo[v] for k, v in kwargs["quant_config"].items()})
    llm = LLM(**kwargs)
    try:
        llm.save(str(output_dir))
    finally:
        llm.shutdown()


def backend_version() -> str | None:
    if not available():
        return None
    import tensorrt_llm  # type: ignore[import-not-found,unused-ignore]

    return str(getattr(tensorrt_llm, "__version__", "unknown"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_healthy(url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Wait for `url`/health to answer 200 while `proc` lives."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"trtllm-serve exited with status {proc.returncode} before it was ready")
        try:
            if httpx.get(url + "/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"trtllm-serve was not healthy within {timeout_s:.0f}s")
        time.sleep(1.0)


def serve(
    model: str,
    opts: TrtOptions,
    *,
    served_model_name: str,
    host: str,
    port: int,
    tokenizer: str | None,
    engine_backend: str,
    api_key: str | None,
    drain_timeout_s: float,
    startup_timeout_s: float = 3600.0,
) -> None:
    """Run `trtllm-serve` on a loopback port behind Kiln's proxy (same API, auth, drain and metrics)."""
    require()
    exe = shutil.which("trtllm-serve")
    if exe is None:
        raise TensorRTLLMUnavailable(
            "tensorrt_llm is importable but `trtllm-serve` is not on PATH. " + IMAGE_HINT
        )
    from kiln_engine.server.proxy import UpstreamSettings, serve_proxy

    extra = Path(os.environ.get("TMPDIR", "/tmp")) / "kiln-trtllm-extra-options.yaml"
    extra.write_text(yaml.safe_dump(extra_llm_api_options(opts, engine_backend), sort_keys=True))
    inner = _free_port()
    argv = trtllm_serve_args(
        model, opts, host="127.0.0.1", port=inner, extra_options_file=str(extra), tokenizer=tokenizer,
        engine_backend=engine_backend,
    )  # fmt: skip
    proc = subprocess.Popen([exe, *argv[1:]])
    try:
        url = f"http://127.0.0.1:{inner}"
        wait_until_healthy(url, proc, startup_timeout_s)
        serve_proxy(
            served_model_name, UpstreamSettings(url=url), host=host, port=port, api_key=api_key,
            drain_timeout_s=drain_timeout_s, max_model_len=opts.max_seq_len,
        )  # fmt: skip
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
