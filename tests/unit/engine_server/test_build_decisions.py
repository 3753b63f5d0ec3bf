"""Pure decisions of the build (no torch): option checks, conversion mode, output config, identity of
an existing artifact, the capacity search, the --result-file JSON and the TensorRT-LLM option mapping.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kiln_engine.build import result
from kiln_engine.build.capacity import Burst, load_shape, percentile, search_max_concurrency
from kiln_engine.build.manifest import Capacity, Manifest, RuntimeInfo
from kiln_engine.build.pipeline import (
    BuildError,
    BuildOptions,
    check_parallelism,
    conversion_mode,
    is_same_build,
    output_config,
    output_target,
    recorded_options,
    stale_siblings,
    validate_options,
)
from kiln_engine.build.trt import trt_options
from kiln_engine.config import ModelConfig

LLAMA: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 384, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "torch_dtype": "float32",
}  # fmt: skip


def model_config() -> ModelConfig:
    return ModelConfig.from_dict(LLAMA)


def test_build_modules_import_no_torch() -> None:
    # The TensorRT-LLM build, the CLI's error paths and the operator side must not need torch.
    code = (
        "import sys; import kiln_engine.build.pipeline, kiln_engine.build.trt, kiln_engine.build.result, "
        "kiln_engine.build.capacity, kiln_engine.build.progress, kiln_engine.build.source; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize(
    ("quantization", "checkpoint", "mode"),
    [("none", "none", "keep"), ("bf16", "none", "bf16"), ("fp16", "none", "fp16"), ("fp8", "none", "fp8"),
     ("int8-weight", "none", "int8"), ("int4-awq", "awq", "keep"), ("int4-gptq", "gptq", "keep"),
     ("none", "awq", "keep"), ("fp8", "fp8", "keep"), ("int8-weight", "int8", "keep"),
     # gpt-oss's MXFP4 experts: kept packed, or dequantized as they are read and converted as float
     ("mxfp4", "mxfp4", "mxfp4"), ("none", "mxfp4", "keep"), ("fp8", "mxfp4", "fp8"),
     ("bf16", "mxfp4", "bf16")],
)  # fmt: skip
def test_conversion_mode(quantization: str, checkpoint: str, mode: str) -> None:
    assert conversion_mode(quantization, checkpoint, "src") == mode


def test_conversion_mode_refuses_mismatched_formats() -> None:
    with pytest.raises(
        BuildError, match=r"int4-gptq loads checkpoints published in GPTQ.*not quantized"
    ) as e:
        conversion_mode("int4-gptq", "none", "src")
    assert e.value.reason == "InvalidOptions"
    with pytest.raises(BuildError, match=r"int4-awq .* quantized with gptq"):
        conversion_mode("int4-awq", "gptq", "src")
    with pytest.raises(BuildError, match="already quantized with awq"):
        conversion_mode("fp8", "awq", "src")
    with pytest.raises(BuildError, match=r"mxfp4 loads checkpoints published in MXFP4.*not quantized"):
        conversion_mode("mxfp4", "none", "src")


def test_parallelism_checks() -> None:
    cfg = model_config()  # 4 heads, 2 KV heads, intermediate 128, 2 layers
    check_parallelism(cfg, 2, 2)
    check_parallelism(cfg, 4, 1)  # KV heads replicated: 4 ranks over 2 KV heads
    with pytest.raises(BuildError, match="num_attention_heads 4 is not divisible by 3") as e:
        check_parallelism(cfg, 3, 1)
    assert e.value.reason == "InvalidOptions"
    with pytest.raises(BuildError, match="exceeds the model's 2 decoder layers"):
        check_parallelism(cfg, 1, 3)


def test_packed_mxfp4_experts_split_only_in_whole_groups_of_32_inputs() -> None:
    # gpt-oss-120b's experts: 128 of intermediate size 2,880 (90 groups of 32 inputs)
    gpt_oss = ModelConfig.from_dict({
        **LLAMA, "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": 2880,
        "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64, "intermediate_size": 2880,
        "num_local_experts": 128, "num_experts_per_tok": 4, "layer_types": ["full_attention"] * 2,
        "quantization_config": {"quant_method": "mxfp4", "kiln_packed_experts": True},
    })  # fmt: skip
    check_parallelism(gpt_oss, 2, 1)  # 45 groups a rank
    with pytest.raises(
        BuildError, match="mxfp4 groups 32 inputs, the experts' intermediate size per rank is 720"
    ):
        check_parallelism(gpt_oss, 4, 1)
    assert gpt_oss.moe is not None
    whole = dataclasses.replace(gpt_oss, moe=dataclasses.replace(gpt_oss.moe, expert_parallel=True))
    check_parallelism(whole, 4, 1)  # expert parallel: every expert whole on its rank


def test_validate_options() -> None:
    validate_options(BuildOptions(model="m", output="o"))
    for bad, match in [
        ({"quantization": "int3"}, "unknown quantization"),
        ({"kv_cache_dtype": "int4"}, "unknown kv cache dtype"),
        ({"fp8_scales": "block"}, "fp8 scales"),
        ({"tensor_parallel_size": 0}, "at least 1"),
        ({"ttft_target_ms": 0.0}, "positive"),
    ]:
        with pytest.raises(BuildError, match=match):
            validate_options(BuildOptions(model="m", output="o", **bad))  # type: ignore[arg-type]
    validate_options(BuildOptions(model="m", output="o", backend="tensorrt-llm", kv_cache_dtype="fp8"))
    validate_options(BuildOptions(model="m", output="o", backend="torch", kv_cache_dtype="fp8"))


def test_output_config_records_dtype_or_quantization() -> None:
    base = {"architectures": ["LlamaForCausalLM"], "torch_dtype": "float32"}
    assert output_config(base, "keep") == base
    assert output_config(base, "bf16")["torch_dtype"] == "bfloat16"
    fp8 = output_config(base, "fp8", "tensor")
    assert fp8["quantization_config"] == {"quant_method": "fp8", "activation_scheme": "dynamic",
                                          "weight_scheme": "tensor"}  # fmt: skip
    assert fp8["torch_dtype"] == "float32" and "quantization_config" not in base
    assert output_config(base, "int8")["quantization_config"]["quant_method"] == "int8"
    # the runtime reads what the build writes
    assert ModelConfig.from_dict({**LLAMA, **fp8}).quant.method == "fp8"


def test_output_targets(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KILN_PVC_ROOT", str(tmp_path))
    monkeypatch.setenv("KILN_WORK_DIR", str(tmp_path / "work"))
    t = output_target("pvc://cache/engines/k")
    assert t.path == tmp_path / "cache/engines/k" and not t.remote
    try:
        import boto3  # noqa: F401
    except ImportError:
        with pytest.raises(BuildError, match="need boto3"):  # said before anything is built
            output_target("s3://bucket/engines/k")
    else:  # pragma: no cover
        s3 = output_target("s3://bucket/engines/k")
        assert s3.remote and s3.path.is_relative_to(tmp_path / "work") and s3.uri == "s3://bucket/engines/k"
    with pytest.raises(BuildError, match="artifacts go to") as e:
        output_target("hf://org/name")
    assert e.value.reason == "InvalidOptions"
    out = tmp_path / "art"
    for name in (".art.partial-1", ".art.capacity-2", ".art.old-3", ".other.partial-4", "art"):
        (tmp_path / name).mkdir()
    assert [p.name for p in stale_siblings(out)] == [".art.capacity-2", ".art.old-3", ".art.partial-1"]


def manifest_for(opts: BuildOptions, capacity: Capacity | None = None) -> Manifest:
    from kiln_engine import __version__

    return Manifest(
        runtime=RuntimeInfo(version=__version__), gpu_arch="sm90", source=opts.model, source_fingerprint="f",
        config_hash="h", quantization=opts.quantization, build_options=recorded_options(opts), files=[],
        created_at="now", capacity=capacity,
    )  # fmt: skip


def test_is_same_build() -> None:
    opts = BuildOptions(model="hf://o/m@abc", output="pvc://c/k", measure_capacity=False)
    m = manifest_for(opts)
    assert is_same_build(m, "hf://o/m@abc", "f", "sm90", opts)
    # where it goes, and where capacity is measured, do not change the artifact
    assert is_same_build(
        m, "hf://o/m@abc", "f", "sm90", BuildOptions(**{**opts.__dict__, "device": "cuda:1"})
    )
    assert not is_same_build(m, "hf://o/m@abc", "g", "sm90", opts)  # the checkpoint changed
    assert not is_same_build(m, "hf://o/m@abc", "f", "sm80", opts)
    assert not is_same_build(
        m, "hf://o/m@abc", "f", "sm90", BuildOptions(**{**opts.__dict__, "quantization": "fp8"})
    )
    # asking for capacity that the existing artifact lacks means building again
    wants = BuildOptions(**{**opts.__dict__, "measure_capacity": True})
    assert not is_same_build(m, "hf://o/m@abc", "f", "sm90", wants)
    cap = Capacity(output_tokens_per_second=1, prefill_tokens_per_second=1, max_concurrency_at_ttft_target=1,
                   ttft_target_ms=500)  # fmt: skip
    assert is_same_build(manifest_for(wants, cap), "hf://o/m@abc", "f", "sm90", wants)
    tp2 = BuildOptions(**{**wants.__dict__, "tensor_parallel_size": 2})
    assert is_same_build(manifest_for(tp2), "hf://o/m@abc", "f", "sm90", tp2)  # measured by serving pods


def burst(c: int, p90_ms: float) -> Burst:
    return Burst(c, (p90_ms / 1000,) * c, 1000.0 * c, 100.0 * c, 0.1)


def test_capacity_search_finds_the_largest_burst_within_the_target() -> None:
    asked: list[int] = []

    def measure(c: int) -> Burst:
        asked.append(c)
        return burst(c, 40.0 * c)  # TTFT grows with the burst: 12 fit under 500 ms, 13 do not

    best, bursts = search_max_concurrency(measure, 64, 0.5)
    assert best == 12 and asked[:5] == [1, 2, 4, 8, 16] and len(bursts) == len(asked)
    assert search_max_concurrency(measure, 4, 0.5)[0] == 4  # capped by the batch size
    assert search_max_concurrency(measure, 6, 0.5)[0] == 6
    assert search_max_concurrency(lambda c: burst(c, 900.0), 64, 0.5)[0] == 0  # not even one
    # a passed deadline keeps what is known
    assert search_max_concurrency(measure, 64, 0.5, deadline=0.0)[0] == 1


def test_capacity_search_holds_the_target_at_the_asked_percentile() -> None:
    """Half of each burst's requests wait much longer (TTFT grows with the burst): at p50 the fast
    half decides, at p90 the slow one, so the same engine fits more requests for a p50 target."""

    def measure(c: int) -> Burst:
        fast, slow = (0.02 * c,) * (c - c // 2), (0.1 * c,) * (c // 2)
        return Burst(c, fast + slow, 1000.0 * c, 100.0 * c, 0.1)

    at_p50, _ = search_max_concurrency(measure, 64, 0.5, quantile=0.5)
    at_p90, _ = search_max_concurrency(measure, 64, 0.5, quantile=0.9)
    assert at_p50 == 25 and at_p90 == 5
    with pytest.raises(ValueError, match="quantile"):
        search_max_concurrency(measure, 64, 0.5, quantile=90)


def test_the_ttft_percentile_is_validated_and_shapes_the_build() -> None:
    """A capacity measured at another percentile is another artifact; a percentile Kiln does not
    measure at is refused before the build starts."""
    p90 = BuildOptions(model="hf://o/m@abc", output="pvc://c/k")
    assert recorded_options(p90) != recorded_options(BuildOptions(**{**p90.__dict__, "ttft_percentile": 50}))
    with pytest.raises(BuildError, match="TTFT percentile 75") as raised:
        validate_options(BuildOptions(**{**p90.__dict__, "ttft_percentile": 75}))
    assert raised.value.reason == "InvalidOptions"


def test_percentile_and_load_shape() -> None:
    assert percentile([], 0.9) == 0.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0], 0.9) == 9.0
    assert percentile([5.0], 0.9) == 5.0
    assert load_shape(512) == (128, 64) and load_shape(8192) == (512, 64)
    prompt, output = load_shape(40)
    assert prompt + output < 40


def test_result_shapes_and_size_limit() -> None:
    cap = Capacity(output_tokens_per_second=123.4, prefill_tokens_per_second=9.0,
                   max_concurrency_at_ttft_target=7, ttft_target_ms=250)  # fmt: skip
    ok = json.loads(result.encode(result.success("pvc://c/k", "ab" * 32, "0.1.0", "sm90", cap)))
    assert ok == {
        "ok": True, "artifact": "pvc://c/k", "manifestSha256": "ab" * 32, "runtimeVersion": "0.1.0",
        "gpuArch": "sm90",
        "capacity": {"tokensPerSecond": 123.4, "maxConcurrency": 7, "ttftTargetMs": 250.0,
                     "ttftPercentile": 90},
    }  # fmt: skip
    assert json.loads(result.encode(result.success("u", "x", "v", "cpu", None)))["capacity"] is None
    huge = result.failure("BuildFailed", "é" * 10_000)
    text = result.encode(huge)
    assert len(text.encode()) < 4096
    back = json.loads(text)
    assert back["ok"] is False and back["reason"] == "BuildFailed" and back["message"].endswith("…")
    assert json.loads(result.encode(result.failure("OutOfMemory", "short")))["message"] == "short"


def test_trt_options_follow_build_options() -> None:
    opts = BuildOptions(model="m", output="o", backend="tensorrt-llm", quantization="int4-awq",
                        tensor_parallel_size=4, pipeline_parallel_size=2, kv_cache_dtype="fp8",
                        max_batch_size=8, max_seq_len=4096, max_num_tokens=1024)  # fmt: skip
    t = trt_options(opts)
    assert (t.quantization, t.tensor_parallel_size, t.pipeline_parallel_size) == ("int4-awq", 4, 2)
    assert (t.kv_cache_dtype, t.max_batch_size, t.max_seq_len, t.max_num_tokens) == ("fp8", 8, 4096, 1024)
