"""`kiln-engine build --backend tensorrt-llm`: a TensorRT engine built with TensorRT-LLM's LLM API,
published like a torch artifact (same staging, manifest written last, atomic rename).

Layout: `engine/` (what `LLM.save` writes: rank engines and their config), the checkpoint's
config.json and tokenizer files, manifest.json. Option mapping lives in
`kiln_engine.backends.tensorrt_llm`; where tensorrt_llm is not importable the build stops before
fetching anything, with reason BackendUnavailable and a message saying how to get the image.
"""

from __future__ import annotations

import json
from pathlib import Path

from kiln_engine.backends import tensorrt_llm as trt
from kiln_engine.build.manifest import Manifest, config_hash
from kiln_engine.build.pipeline import (
    BACKEND_UNAVAILABLE,
    BUILD_FAILED,
    CONFIG_NAME,
    INVALID_CHECKPOINT,
    INVALID_OPTIONS,
    BuildError,
    BuildOptions,
    BuildOutcome,
    copy_tokenizer_files,
    fetch_checkpoint,
    finish_manifest,
    output_target,
    recorded_options,
    reusable,
    reuse_outcome,
    runtime_info,
    source_fingerprint,
    staging,
    translate_errors,
    validate_options,
    with_build_errors,
    write_json_durably,
)
from kiln_engine.build.progress import Progress

ENGINE_DIR = "engine"


def trt_options(opts: BuildOptions) -> trt.TrtOptions:
    """Our build options as TensorRT-LLM takes them."""
    try:
        return trt.TrtOptions(
            quantization=opts.quantization,
            tensor_parallel_size=opts.tensor_parallel_size,
            pipeline_parallel_size=opts.pipeline_parallel_size,
            max_batch_size=opts.max_batch_size,
            max_seq_len=opts.max_seq_len,
            max_num_tokens=opts.max_num_tokens,
            kv_cache_dtype=opts.kv_cache_dtype,
        )
    except ValueError as exc:
        raise BuildError(str(exc), INVALID_OPTIONS) from exc


def run_trt_build(opts: BuildOptions, progress: Progress) -> Path:
    return build_trt_artifact(opts, progress).path


def build_trt_artifact(opts: BuildOptions, progress: Progress) -> BuildOutcome:
    """Build, save and publish a TensorRT-LLM engine for `opts` (gpu arch required: the engine bakes it)."""
    return with_build_errors(_build, opts, progress)


def _build(opts: BuildOptions, progress: Progress) -> BuildOutcome:
    validate_options(opts)
    options = trt_options(opts)
    if not trt.available():
        raise BuildError(trt.IMAGE_HINT, BACKEND_UNAVAILABLE)
    target = output_target(opts.output)
    gpu_arch = opts.gpu_arch or _local_gpu_arch()
    progress.update("fetch", 0.0, f"fetching {opts.model}")
    loc, checkpoint = fetch_checkpoint(opts.model, progress)
    progress.update("fetch", 1.0, f"checkpoint at {checkpoint}")
    progress.update("load", 0.0, f"reading {checkpoint / CONFIG_NAME}")
    try:
        raw_config = json.loads((checkpoint / CONFIG_NAME).read_text())
    except (OSError, ValueError) as exc:
        raise BuildError(f"{checkpoint}: no readable {CONFIG_NAME} ({exc})", INVALID_CHECKPOINT) from exc
    fingerprint = source_fingerprint(loc, checkpoint)
    existing = reusable(target, opts.model, fingerprint, gpu_arch, opts)
    if existing is not None:
        return reuse_outcome(target, existing, progress)
    progress.update("load", 1.0, f"{(raw_config.get('architectures') or ['?'])[0]}")
    with staging(target) as partial:
        progress.update("convert", 0.0, "building the TensorRT engine (quantize, shard, compile)")
        try:
            trt.build_engine(str(checkpoint), partial / ENGINE_DIR, options)
        except trt.TensorRTLLMUnavailable as exc:
            raise BuildError(str(exc), BACKEND_UNAVAILABLE) from exc
        except Exception as exc:
            if translate_errors(exc) is not None:
                raise
            raise BuildError(f"TensorRT-LLM build failed: {type(exc).__name__}: {exc}", BUILD_FAILED) from exc
        progress.update("convert", 1.0, "engine built")
        progress.update("write", 0.0, "writing config.json")
        write_json_durably(partial / CONFIG_NAME, raw_config)
        progress.update("write", 1.0, "config.json written")
        progress.update("tokenizer", 0.0, "copying tokenizer files")
        copied = copy_tokenizer_files(checkpoint, partial)
        progress.update("tokenizer", 1.0, ", ".join(copied) or "no tokenizer files in the checkpoint")
        progress.update("capacity", 1.0, "skipped: TensorRT-LLM engines are measured by their serving pods")
        manifest = Manifest(
            runtime=runtime_info("tensorrt-llm", trt.backend_version()),
            backend="tensorrt-llm",
            gpu_arch=gpu_arch,
            source=opts.model,
            source_fingerprint=fingerprint,
            architecture=str((raw_config.get("architectures") or [""])[0]),
            config_hash=config_hash(raw_config),
            quantization=opts.quantization,
            kv_cache_dtype=opts.kv_cache_dtype,
            dtype=str(trt.DTYPE.get(opts.quantization, raw_config.get("torch_dtype") or "auto")),
            tensor_parallel_size=opts.tensor_parallel_size,
            pipeline_parallel_size=opts.pipeline_parallel_size,
            build_options=recorded_options(opts),
            files=[],
            created_at="",
        )
        return finish_manifest(partial, manifest, target, progress)


def _local_gpu_arch() -> str:
    import torch

    if not torch.cuda.is_available():
        raise BuildError("a TensorRT-LLM build needs a CUDA GPU (or --gpu-arch)", INVALID_OPTIONS)
    major, minor = torch.cuda.get_device_capability()
    return f"sm{major}{minor}"
