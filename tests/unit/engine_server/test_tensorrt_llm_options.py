"""Our build/serve options mapped onto TensorRT-LLM's names (pure functions; no TensorRT-LLM needed)."""

from __future__ import annotations

import pytest
import yaml

from kiln_engine.backends import tensorrt_llm as trt


def flags(argv: list[str]) -> dict[str, str]:
    """`--name value` pairs of an argv (after the program and positional model)."""
    out = {}
    for i, a in enumerate(argv):
        if a.startswith("--") and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out[a] = argv[i + 1]
    return out


@pytest.mark.parametrize(
    ("ours", "algo"),
    [("none", None), ("bf16", None), ("fp16", None), ("fp8", "FP8"), ("int8-weight", "W8A16"),
     ("int4-awq", "W4A16_AWQ"), ("int4-gptq", "W4A16_GPTQ")],
)  # fmt: skip
def test_quantization_maps_to_quant_algo(ours: str, algo: str | None) -> None:
    qc = trt.quant_config(trt.TrtOptions(quantization=ours))
    assert (qc or {}).get("quant_algo") == algo
    kwargs = trt.llm_api_kwargs("/ckpt", trt.TrtOptions(quantization=ours))
    assert ("quant_config" in kwargs) == (algo is not None)
    assert kwargs["dtype"] == {"bf16": "bfloat16", "fp16": "float16"}.get(ours, "auto")


def test_fp8_kv_cache_sets_both_the_cache_dtype_and_the_kv_quant_algo() -> None:
    opts = trt.TrtOptions(quantization="int4-awq", kv_cache_dtype="fp8")
    assert trt.quant_config(opts) == {"quant_algo": "W4A16_AWQ", "kv_cache_quant_algo": "FP8"}
    assert trt.kv_cache_config(opts)["dtype"] == "fp8"
    assert trt.quant_config(trt.TrtOptions(kv_cache_dtype="fp8")) == {"kv_cache_quant_algo": "FP8"}
    assert trt.kv_cache_config(trt.TrtOptions(kv_cache_dtype="bf16"))["dtype"] == "auto"


def test_llm_api_kwargs_cover_parallelism_limits_and_caching() -> None:
    opts = trt.TrtOptions(
        quantization="fp8", tensor_parallel_size=4, pipeline_parallel_size=2, max_batch_size=128,
        max_seq_len=8192, max_num_tokens=4096, prefix_caching=False, chunked_prefill=True,
        kv_cache_free_gpu_memory_fraction=0.8,
    )  # fmt: skip
    kw = trt.llm_api_kwargs("/models/llama", opts)
    assert kw["model"] == "/models/llama"
    assert kw["tensor_parallel_size"] == 4 and kw["pipeline_parallel_size"] == 2
    assert kw["build_config"] == {"max_batch_size": 128, "max_num_tokens": 4096, "max_seq_len": 8192}
    assert kw["kv_cache_config"] == {
        "enable_block_reuse": False,
        "free_gpu_memory_fraction": 0.8,
        "dtype": "auto",
    }
    assert kw["enable_chunked_prefill"] is True
    assert kw["quant_config"] == {"quant_algo": "FP8"}
    assert "max_seq_len" not in trt.build_config(trt.TrtOptions())


def test_trtllm_build_args() -> None:
    opts = trt.TrtOptions(quantization="fp8", kv_cache_dtype="fp8", tensor_parallel_size=2, max_seq_len=4096)
    argv = trt.trtllm_build_args("/ckpt", "/engine", opts)
    assert argv[0] == "trtllm-build"
    f = flags(argv)
    assert f["--checkpoint_dir"] == "/ckpt" and f["--output_dir"] == "/engine"
    assert f["--max_batch_size"] == "64" and f["--max_num_tokens"] == "2048" and f["--max_seq_len"] == "4096"
    assert f["--use_paged_context_fmha"] == "enable" and f["--use_fp8_context_fmha"] == "enable"
    assert f["--workers"] == "2"
    plain = flags(
        trt.trtllm_build_args("/c", "/e", trt.TrtOptions(prefix_caching=False, chunked_prefill=False))
    )
    assert plain["--use_paged_context_fmha"] == "disable" and "--max_seq_len" not in plain
    assert "--use_fp8_context_fmha" not in plain


@pytest.mark.parametrize(
    ("ours", "qformat"),
    [("fp8", "fp8"), ("int8-weight", "int8_wo"), ("int4-awq", "int4_awq"), ("int4-gptq", "int4_gptq"),
     ("bf16", "full_prec")],
)  # fmt: skip
def test_quantize_script_qformat(ours: str, qformat: str) -> None:
    f = flags(trt.quantize_script_args("/m", "/o", trt.TrtOptions(quantization=ours, tensor_parallel_size=8)))
    assert f["--qformat"] == qformat and f["--tp_size"] == "8" and f["--pp_size"] == "1"


def test_trtllm_serve_args_and_extra_options() -> None:
    opts = trt.TrtOptions(tensor_parallel_size=2, max_batch_size=32, max_seq_len=2048, kv_cache_dtype="fp8")
    argv = trt.trtllm_serve_args(
        "/art/engine", opts, host="0.0.0.0", port=8000, extra_options_file="/tmp/x.yaml", tokenizer="/art",
    )  # fmt: skip
    assert argv[:2] == ["trtllm-serve", "/art/engine"]
    f = flags(argv)
    assert f["--backend"] == "tensorrt" and f["--tp_size"] == "2" and f["--pp_size"] == "1"
    assert f["--max_batch_size"] == "32" and f["--max_seq_len"] == "2048" and f["--port"] == "8000"
    assert f["--kv_cache_free_gpu_memory_fraction"] == "0.9" and f["--tokenizer"] == "/art"
    assert f["--extra_llm_api_options"] == "/tmp/x.yaml"
    extra = yaml.safe_load(yaml.safe_dump(trt.extra_llm_api_options(opts, "tensorrt")))
    assert extra["kv_cache_config"] == {"enable_block_reuse": True, "dtype": "fp8"}
    assert extra["enable_chunked_prefill"] is True


def test_invalid_options_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown quantization"):
        trt.TrtOptions(quantization="int3")
    with pytest.raises(ValueError, match="kv cache dtype"):
        trt.TrtOptions(kv_cache_dtype="int4")
    with pytest.raises(ValueError, match="free_gpu_memory_fraction"):
        trt.TrtOptions(kv_cache_free_gpu_memory_fraction=0)


@pytest.mark.skipif(trt.available(), reason="TensorRT-LLM is installed here")
def test_without_tensorrt_llm_the_backend_says_so() -> None:
    with pytest.raises(trt.TensorRTLLMUnavailable, match=r"Dockerfile\.tensorrt-llm"):
        trt.require()
    from pathlib import Path

    with pytest.raises(trt.TensorRTLLMUnavailable, match="not installed"):
        trt.build_engine("/ckpt", Path("/tmp/out"), trt.TrtOptions())
