"""`kiln-engine build` for the torch backend: fetch, check, convert and shard, copy the tokenizer,
measure capacity, write the manifest last and publish atomically.

Everything is written into `.<name>.partial-<id>` next to the output and renamed into place once
the manifest is in it, so a build killed at any point leaves no artifact at the output path; the
next build removes the partial directory. One build per output at a time (the operator runs one Job
per engine key). The decisions (option checks, conversion mode, output config, identity of an
existing artifact) are pure functions; torch is imported only by the steps that need it, so this
module also serves the TensorRT-LLM build and the CLI's error paths without loading torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kiln_engine import __version__
from kiln_engine.build import source as src
from kiln_engine.build.manifest import (
    MANIFEST_NAME,
    TTFT_PERCENTILES,
    Capacity,
    Manifest,
    RuntimeInfo,
    VerificationError,
    config_hash,
    file_entries,
    fsync_dir,
    read_manifest,
    sha256_file,
    verify_artifact,
    write_manifest,
)
from kiln_engine.build.progress import Progress
from kiln_engine.config import (
    MXFP4_PACKED_KEY,
    ModelConfig,
    UnsupportedModelError,
    parse_quant,
    with_expert_parallel,
)
from kiln_engine.draft import DRAFT_DIR

QUANTIZATIONS = ("none", "bf16", "fp16", "fp8", "int8-weight", "int4-awq", "int4-gptq", "mxfp4")
KV_CACHE_DTYPES = ("auto", "bf16", "fp16", "fp8")
BACKENDS = ("torch", "tensorrt-llm")
FP8_SCALES = ("channel", "tensor")
CONFIG_NAME = "config.json"
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16"}
# int4 quantizations load checkpoints published in that format: (config quant_method, display name).
PUBLISHED_FORMATS = {"int4-awq": ("awq", "AWQ"), "int4-gptq": ("gptq", "GPTQ"), "mxfp4": ("mxfp4", "MXFP4")}

# Failure reasons written to --result-file (CamelCase, as Kubernetes condition reasons).
CHECKPOINT_NOT_FOUND = "CheckpointNotFound"
INVALID_CHECKPOINT = "InvalidCheckpoint"
UNSUPPORTED_ARCHITECTURE = "UnsupportedArchitecture"
INVALID_OPTIONS = "InvalidOptions"
OUT_OF_MEMORY = "OutOfMemory"
BACKEND_UNAVAILABLE = "BackendUnavailable"
BUILD_FAILED = "BuildFailed"


class BuildError(Exception):
    """A build that cannot succeed; `reason` says why in one CamelCase word."""

    def __init__(self, message: str, reason: str = BUILD_FAILED) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class BuildOptions:
    """What `kiln-engine build` was asked for (the CLI's options, one to one)."""

    model: str
    output: str
    backend: str = "torch"
    quantization: str = "none"
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    kv_cache_dtype: str = "auto"
    max_batch_size: int = 64
    max_seq_len: int | None = None
    max_num_tokens: int = 2048
    gpu_arch: str | None = None
    measure_capacity: bool = True
    ttft_target_ms: float = 500.0
    ttft_percentile: int = 90  # the percentile the TTFT target holds at (capacity measurement)
    device: str | None = None
    fp8_scales: str = "channel"  # per output channel, or one per tensor
    capacity_time_budget_s: float = 300.0
    draft_model: str | None = None  # speculative decoding's draft, carried in DRAFT_DIR as fetched
    expert_parallel: bool = False  # experts whole, E / tp a rank, instead of a slice of each


@dataclass(frozen=True)
class BuildOutcome:
    """A published artifact: where it is (locally and as asked for) and its manifest."""

    path: Path
    uri: str
    manifest: Manifest
    manifest_sha256: str
    reused: bool = False


# -- pure decisions ---------------------------------------------------------------------------------
def validate_options(opts: BuildOptions) -> None:
    """Reject option combinations no build can satisfy, before anything is fetched."""

    def bad(message: str) -> BuildError:
        return BuildError(message, INVALID_OPTIONS)

    if opts.backend not in BACKENDS:
        raise bad(f"unknown backend {opts.backend!r}; choose from {', '.join(BACKENDS)}")
    if opts.quantization not in QUANTIZATIONS:
        raise bad(f"unknown quantization {opts.quantization!r}; choose from {', '.join(QUANTIZATIONS)}")
    if opts.kv_cache_dtype not in KV_CACHE_DTYPES:
        raise bad(f"unknown kv cache dtype {opts.kv_cache_dtype!r}; choose from {', '.join(KV_CACHE_DTYPES)}")
    if opts.fp8_scales not in FP8_SCALES:
        raise bad(f"fp8 scales are per {' or per '.join(FP8_SCALES)}, not {opts.fp8_scales!r}")
    if opts.tensor_parallel_size < 1 or opts.pipeline_parallel_size < 1:
        raise bad("tensor and pipeline parallel sizes must be at least 1")
    if opts.max_batch_size < 1 or opts.max_num_tokens < 1 or opts.ttft_target_ms <= 0:
        raise bad("max batch size, max num tokens and the TTFT target must be positive")
    if opts.ttft_percentile not in TTFT_PERCENTILES:
        raise bad(f"TTFT percentile {opts.ttft_percentile}: use one of {TTFT_PERCENTILES}")
    if opts.draft_model is not None and opts.backend != "torch":
        raise bad("a draft model is served by the torch backend only")
    if opts.quantization == "mxfp4" and opts.backend != "torch":
        raise bad("mxfp4 (gpt-oss's experts kept packed) is served by the torch backend only")
    if opts.expert_parallel and (opts.backend != "torch" or opts.tensor_parallel_size < 2):
        raise bad("expert parallelism needs the torch backend and a tensor-parallel size of at least 2")
    if opts.draft_model is not None and opts.tensor_parallel_size * opts.pipeline_parallel_size > 1:
        raise bad("a draft model speculates on one rank only: not with tensor or pipeline parallelism")


def conversion_mode(quantization: str, checkpoint_method: str, source: str) -> str:
    """How tensors are converted: keep, bf16, fp16 (casts), fp8 or int8 (quantize), mxfp4 (gpt-oss's
    MXFP4 experts kept packed).

    A checkpoint published quantized (AWQ, GPTQ, fp8, int8) is kept as published; asking to
    quantize it differently is an error, as is asking for int4 from an unquantized checkpoint.
    gpt-oss's MXFP4 experts are dequantized as they are read unless kept (--quantization mxfp4), so
    such a checkpoint converts like an unquantized one otherwise.
    """
    if quantization in PUBLISHED_FORMATS:
        method, fmt = PUBLISHED_FORMATS[quantization]
        if checkpoint_method != method:
            found = "not quantized" if checkpoint_method == "none" else f"quantized with {checkpoint_method}"
            raise BuildError(
                f"{quantization} loads checkpoints published in {fmt} format (config.json "
                f'quantization_config.quant_method = "{method}"); {source} is {found}. Use a checkpoint '
                f"quantized with {fmt}, or --quantization fp8 / int8-weight to quantize this one",
                INVALID_OPTIONS,
            )
        return "mxfp4" if quantization == "mxfp4" else "keep"
    if checkpoint_method == "mxfp4":
        checkpoint_method = "none"
    if checkpoint_method != "none":
        target = {"fp8": "fp8", "int8-weight": "int8"}.get(quantization)
        if quantization == "none" or target == checkpoint_method:
            return "keep"
        raise BuildError(
            f"{source} is already quantized with {checkpoint_method}; build it with --quantization none "
            "(served as published) or the matching format",
            INVALID_OPTIONS,
        )
    if quantization == "none":
        return "keep"
    return {"bf16": "bf16", "fp16": "fp16", "fp8": "fp8", "int8-weight": "int8"}[quantization]


MXFP4_PACKED = {"quant_method": "mxfp4", MXFP4_PACKED_KEY: True}


def checkpoint_quant_method(raw_config: dict[str, Any], model_config: ModelConfig) -> str:
    """The checkpoint's quantization as published: mxfp4 for OpenAI's gpt-oss checkpoints, whose
    model config reads unquantized (their experts are dequantized as they load)."""
    published = str((raw_config.get("quantization_config") or {}).get("quant_method", "")).lower()
    return "mxfp4" if published == "mxfp4" else model_config.quant.method


def check_parallelism(cfg: ModelConfig, tp: int, pp: int) -> None:
    """Whether the model splits over `tp` tensor-parallel ranks and `pp` pipeline stages."""
    problems = []
    if cfg.num_attention_heads % tp:
        problems.append(f"num_attention_heads {cfg.num_attention_heads} is not divisible by {tp}")
    kv = cfg.num_key_value_heads
    if kv % tp and tp % kv:
        problems.append(f"num_key_value_heads {kv} is not divisible by {tp} (nor {tp} by it)")
    if cfg.intermediate_size % tp:
        problems.append(f"intermediate_size {cfg.intermediate_size} is not divisible by {tp}")
    if cfg.moe is not None and not cfg.moe.expert_parallel and cfg.moe.intermediate_size % tp:
        problems.append(
            f"the experts' intermediate size {cfg.moe.intermediate_size} is not divisible by {tp}"
        )
    if not problems:
        problems = int4_split_problems(cfg, tp) + mxfp4_split_problems(cfg, tp)
    if problems:
        raise BuildError(
            f"tensor-parallel size {tp} does not fit the model: " + "; ".join(problems), INVALID_OPTIONS
        )
    if pp > cfg.num_hidden_layers:
        raise BuildError(
            f"pipeline-parallel size {pp} exceeds the model's {cfg.num_hidden_layers} decoder layers",
            INVALID_OPTIONS,
        )


def int4_split_problems(cfg: ModelConfig, tp: int) -> list[str]:
    """Why AWQ/GPTQ tensors (8 values per int32, scales per input group) do not split over `tp` ranks."""
    quant = cfg.quant
    if quant.method not in ("awq", "gptq") or tp == 1:
        return []
    attn = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads
    kv_out = kv * cfg.head_dim // tp if kv >= tp else cfg.head_dim
    problems = []
    columns = (("q_proj", attn // tp), ("k/v_proj", kv_out), ("gate/up_proj", cfg.intermediate_size // tp))
    for what, outputs in columns:
        if outputs % 8:
            problems.append(
                f"{quant.method} packs 8 output channels per int32, {what} has {outputs} per rank"
            )
    for what, inputs in (("o_proj", attn), ("down_proj", cfg.intermediate_size)):
        groups = inputs // quant.group_size if quant.group_size > 0 else 1
        if groups % tp:
            problems.append(f"{quant.method} {what} has {groups} input groups, not divisible by {tp}")
        if quant.method == "gptq" and (inputs // tp) % 8:
            problems.append(f"gptq packs 8 input rows per int32, {what} has {inputs // tp} per rank")
    return problems


def mxfp4_split_problems(cfg: ModelConfig, tp: int) -> list[str]:
    """Why packed MXFP4 experts (one exponent per 32 inputs) do not split over `tp` ranks."""
    if cfg.quant.method != "mxfp4" or cfg.moe is None:
        return []
    inputs = (
        ("hidden size", cfg.hidden_size),
        (
            "experts' intermediate size per rank",
            cfg.moe.intermediate_size // (1 if cfg.moe.expert_parallel else tp),
        ),
    )
    return [f"mxfp4 groups 32 inputs, the {what} is {n}" for what, n in inputs if n % 32]


def output_config(config: dict[str, Any], mode: str, fp8_scales: str = "channel") -> dict[str, Any]:
    """The artifact's config.json: the checkpoint's, with the dtype or quantization it was built with."""
    out = dict(config)
    if mode in DTYPE_NAMES:
        out["torch_dtype"] = DTYPE_NAMES[mode]
    elif mode == "fp8":
        out["quantization_config"] = {
            "quant_method": "fp8",
            "activation_scheme": "dynamic",
            "weight_scheme": fp8_scales,
        }
    elif mode == "int8":
        out["quantization_config"] = {"quant_method": "int8", "bits": 8, "weight_only": True}
    elif mode == "mxfp4":
        out["quantization_config"] = dict(MXFP4_PACKED)
    return out


def serving_dtype(config: dict[str, Any]) -> str:
    """The activation/weight dtype the artifact is served in (config's torch_dtype)."""
    return str(config.get("torch_dtype") or config.get("dtype") or "auto")


def recorded_options(opts: BuildOptions) -> dict[str, Any]:
    """The options that shape the artifact (where it goes and where it is measured do not)."""
    skip = {"model", "output", "device", "measure_capacity", "capacity_time_budget_s", "gpu_arch"}
    return {k: v for k, v in dataclasses.asdict(opts).items() if k not in skip}


def is_same_build(
    manifest: Manifest, source: str, fingerprint: str, gpu_arch: str, opts: BuildOptions
) -> bool:
    """Whether an existing artifact's manifest records exactly this build (so it need not be redone)."""
    wants_capacity = opts.measure_capacity and measurable(opts)
    return (
        manifest.source == source
        and manifest.source_fingerprint == fingerprint
        and manifest.runtime.version == __version__
        and manifest.backend == opts.backend
        and manifest.gpu_arch == gpu_arch
        and manifest.build_options == recorded_options(opts)
        and (manifest.capacity is not None or not wants_capacity)
    )


def measurable(opts: BuildOptions) -> bool:
    """Capacity is measured in-process for single-rank artifacts; serving pods measure the rest."""
    return opts.backend == "torch" and opts.tensor_parallel_size * opts.pipeline_parallel_size == 1


def source_fingerprint(loc: src.Location, checkpoint: Path) -> str:
    """Identifies the checkpoint's content cheaply: files, sizes and times (hf: the snapshot commit;
    s3: the objects' sizes and ETags)."""
    entries = []
    for p in sorted(checkpoint.iterdir()):
        if p.is_file() and not p.name.startswith("."):
            st = p.stat()
            entries.append([p.name, st.st_size, 0 if loc.scheme == "hf" else st.st_mtime_ns])
    if loc.scheme == "s3":  # the objects' ETags: a download's local times differ from pod to pod
        entries = sorted([rel, size, etag] for rel, (size, etag) in src.s3_objects(str(loc)).items())
    head = f"hf:{loc.path}@{checkpoint.name}" if loc.scheme == "hf" else "files"
    return hashlib.sha256(json.dumps([head, entries]).encode()).hexdigest()


def partial_name(output: Path) -> str:
    return f".{output.name}.partial-{uuid.uuid4().hex[:12]}"


def stale_siblings(output: Path) -> list[Path]:
    """Leftovers of earlier builds of `output`: partial directories and capacity views."""
    parent = output.parent
    if not parent.is_dir():
        return []
    return sorted(
        p
        for pattern in (f".{output.name}.partial-*", f".{output.name}.capacity-*", f".{output.name}.old-*")
        for p in parent.glob(pattern)
    )


# -- I/O steps --------------------------------------------------------------------------------------
def resolve_device(device: str | None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def detect_gpu_arch(device: str) -> str:
    """`sm<major><minor>` of the CUDA device (as `kiln.api.enginekey.gpu_arch` names them), or cpu."""
    if not device.startswith("cuda"):
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        raise BuildError(f"--device {device}: CUDA is not available here", INVALID_OPTIONS)
    major, minor = torch.cuda.get_device_capability(torch.device(device))
    return f"sm{major}{minor}"


def device_name(device: str) -> str:
    if not device.startswith("cuda"):
        return "cpu"
    import torch

    return str(torch.cuda.get_device_name(torch.device(device)))


def runtime_info(backend: str = "torch", backend_version: str | None = None) -> RuntimeInfo:
    try:
        import torch

        torch_version: str | None = str(torch.__version__)
    except ImportError:  # pragma: no cover - the TensorRT-LLM image has torch too
        torch_version = None
    return RuntimeInfo(version=__version__, backend=backend, torch_version=torch_version,
                       backend_version=backend_version)  # fmt: skip


def read_checkpoint_config(path: Path) -> tuple[dict[str, Any], ModelConfig]:
    """config.json of a checkpoint, parsed; BuildError with the reason when it cannot be served."""
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise BuildError(f"{path} has no {CONFIG_NAME}: not a Hugging Face checkpoint", INVALID_CHECKPOINT)
    try:
        raw = json.loads(cfg_path.read_text())
    except ValueError as exc:
        raise BuildError(f"{cfg_path} is not valid JSON: {exc}", INVALID_CHECKPOINT) from exc
    if not isinstance(raw, dict):
        raise BuildError(f"{cfg_path} is not a JSON object", INVALID_CHECKPOINT)
    try:
        return raw, ModelConfig.from_dict(raw)
    except UnsupportedModelError as exc:
        raise BuildError(f"{path}: {exc}", UNSUPPORTED_ARCHITECTURE) from exc
    except (KeyError, TypeError, ValueError) as exc:
        raise BuildError(f"{cfg_path}: missing or malformed field: {exc}", INVALID_CHECKPOINT) from exc


def check_weights(path: Path) -> None:
    if (path / "model.safetensors.index.json").is_file() or any(path.glob("*.safetensors")):
        return
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise BuildError(
            f"{path} has only pickled weights (*.bin); Kiln builds from safetensors checkpoints",
            INVALID_CHECKPOINT,
        )
    raise BuildError(f"{path} has no *.safetensors weights", INVALID_CHECKPOINT)


@dataclass(frozen=True)
class Target:
    """Where the artifact goes: a local directory, and the URI asked for (s3:// is staged locally)."""

    path: Path
    uri: str
    remote: bool


def output_target(uri: str) -> Target:
    try:
        loc = src.parse_uri(uri)
    except src.SourceError as exc:
        raise BuildError(f"--output {exc}", INVALID_OPTIONS) from exc
    if loc.scheme == "hf":
        raise BuildError(f"--output {uri}: artifacts go to a directory, pvc:// or s3://", INVALID_OPTIONS)
    if loc.scheme == "s3":
        try:
            src.require_s3(loc)
        except src.SourceError as exc:
            raise BuildError(f"--output {exc}", INVALID_OPTIONS) from exc
        digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
        return Target(src.work_dir() / "staging" / digest / "artifact", uri, remote=True)
    return Target(src.local_path(loc), uri, remote=False)


def fetch_checkpoint(uri: str, progress: Progress) -> tuple[src.Location, Path]:
    try:
        loc = src.parse_uri(uri)
        path = src.fetch(uri, src.work_dir(), lambda f, m: progress.update("fetch", f, m))
    except src.SourceError as exc:
        reason = INVALID_CHECKPOINT if exc.reason == "InvalidCheckpoint" else exc.reason
        raise BuildError(str(exc), reason) from exc
    return loc, path


def fetch_draft(uri: str, checkpoint: Path, progress: Progress) -> tuple[Path, str]:
    """The draft checkpoint and its fingerprint, once it is known to be one the engine can run next
    to `checkpoint`: a supported architecture with weights, and the same tokenizer."""
    progress.update("fetch", 0.0, f"fetching the draft model {uri}")
    loc, draft = fetch_checkpoint(uri, progress)
    from kiln_engine.eagle import check_head, is_eagle_head  # torch: only when there is a draft

    if is_eagle_head(draft):  # a head reads the model's hidden states; it has no tokenizer of its own
        try:
            check_head(draft, read_checkpoint_config(checkpoint)[1])
        except ValueError as exc:
            raise BuildError(str(exc), INVALID_OPTIONS) from exc
        return draft, source_fingerprint(loc, draft)
    read_checkpoint_config(draft)
    check_weights(draft)
    if vocabulary(draft) != vocabulary(checkpoint):
        raise BuildError(
            f"draft model {uri}: its tokenizer differs from the model's; a draft must share it",
            INVALID_OPTIONS,
        )
    return draft, source_fingerprint(loc, draft)


def vocabulary(checkpoint: Path) -> dict[str, int] | None:
    """The tokenizer's token -> id map (tokenizer.json), or None without one."""
    path = checkpoint / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer as HFTokenizer

    vocab: dict[str, int] = HFTokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
    return vocab


def reusable(
    target: Target, source: str, fingerprint: str, gpu_arch: str, opts: BuildOptions
) -> Manifest | None:
    """The existing local artifact at the target when it is exactly this build and still verifies
    (`remote_reusable` answers for s3:// targets)."""
    if target.remote or not (target.path / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = read_manifest(target.path)
        if not is_same_build(manifest, source, fingerprint, gpu_arch, opts):
            return None
        return verify_artifact(target.path)
    except VerificationError:
        return None


def remote_reusable(
    target: Target, source: str, fingerprint: str, gpu_arch: str, opts: BuildOptions
) -> tuple[Manifest, str] | None:
    """The artifact on S3 (manifest, its SHA-256) when it is exactly this build and every file its
    manifest lists is there at its size. Checksums are verified where the files are read: by the
    serving pods, which download them anyway."""
    found = src.read_s3_manifest(target.uri)
    if found is None or not is_same_build(found[0], source, fingerprint, gpu_arch, opts):
        return None
    present = src.s3_objects(target.uri)
    if any(present.get(f.path, (-1, ""))[0] != f.size for f in found[0].files):
        return None
    return found


@contextmanager
def staging(target: Target) -> Iterator[Path]:
    """A fresh partial directory next to the output, removed if the build stops with an exception."""
    target.path.parent.mkdir(parents=True, exist_ok=True)
    for stale in stale_siblings(target.path):
        shutil.rmtree(stale, ignore_errors=True)
    partial = target.path.parent / partial_name(target.path)
    partial.mkdir()
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def copy_tokenizer_files(checkpoint: Path, dest: Path) -> list[str]:
    from kiln_engine.tokenizer import TOKENIZER_FILES

    copied = []
    for name in (*TOKENIZER_FILES, "tokenizer.model"):
        if (checkpoint / name).is_file() and not (dest / name).exists():
            shutil.copyfile(checkpoint / name, dest / name)
            copied.append(name)
    return copied


def write_json_durably(path: Path, value: Any) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(value, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under `root` before the manifest vouches for them."""
    for dirpath, _, names in os.walk(root):
        for name in names:
            fd = os.open(Path(dirpath) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def publish(partial: Path, target: Target, progress: Progress) -> None:
    """Move the finished partial directory into place (or upload it, manifest last)."""
    out = target.path
    if out.exists() or out.is_symlink():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:12]}"
        os.rename(out, old)
        os.rename(partial, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(partial, out)
    fsync_dir(out.parent)
    if target.remote:
        try:
            src.upload_s3(out, target.uri, lambda f, m: progress.update("publish", 0.2 + 0.8 * f, m))
        except src.SourceError as exc:
            raise BuildError(str(exc), BUILD_FAILED) from exc


def finish_manifest(partial: Path, manifest: Manifest, target: Target, progress: Progress) -> BuildOutcome:
    """Checksum everything, write the manifest last, publish; returns the outcome."""
    progress.update("publish", 0.0, "checksumming files")
    fsync_tree(partial)
    manifest = manifest.model_copy(update={"files": file_entries(partial), "created_at": now_iso()})
    write_manifest(partial, manifest)
    progress.update("publish", 0.2, f"publishing {target.uri}")
    publish(partial, target, progress)
    progress.update("publish", 1.0, f"published {target.uri}")
    progress.done(f"published {target.uri}")
    return BuildOutcome(target.path, target.uri, manifest, sha256_file(target.path / MANIFEST_NAME))


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def reuse_outcome(
    target: Target, manifest: Manifest, progress: Progress, digest: str | None = None
) -> BuildOutcome:
    progress.done(f"artifact already present at {target.uri} (same source, options and runtime; verified)")
    digest = digest or sha256_file(target.path / MANIFEST_NAME)
    return BuildOutcome(target.path, target.uri, manifest, digest, reused=True)


def translate_errors(exc: BaseException) -> BuildError | None:
    """A BuildError for an exception a build step raised, when its cause is known."""
    if isinstance(exc, BuildError):
        return exc
    if isinstance(exc, MemoryError):
        return BuildError(f"out of host memory: {exc}", OUT_OF_MEMORY)
    if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch
        return BuildError(f"out of GPU memory: {exc}", OUT_OF_MEMORY)
    if isinstance(exc, src.SourceError):
        return BuildError(str(exc), exc.reason)
    return None


# -- the torch build ----------------------------------------------------------------------------------
def with_build_errors(
    build: Callable[[BuildOptions, Progress], BuildOutcome], opts: BuildOptions, progress: Progress
) -> BuildOutcome:
    """Run `build`, turning the failures `translate_errors` knows into a BuildError with its reason."""
    try:
        return build(opts, progress)
    except BaseException as exc:
        mapped = translate_errors(exc)
        if mapped is None or mapped is exc:
            raise
        raise mapped from exc


def build_artifact(opts: BuildOptions, progress: Progress) -> BuildOutcome:
    """Build and publish the artifact `opts` describes (torch backend)."""
    return with_build_errors(_build, opts, progress)


def run_build(opts: BuildOptions, progress: Progress) -> Path:
    """Build and publish; returns the local artifact directory."""
    return build_artifact(opts, progress).path


def _build(opts: BuildOptions, progress: Progress) -> BuildOutcome:
    validate_options(opts)
    if opts.backend != "torch":
        raise BuildError(f"run_build builds the torch backend, not {opts.backend}", INVALID_OPTIONS)
    target = output_target(opts.output)
    device = resolve_device(opts.device)
    gpu_arch = opts.gpu_arch or detect_gpu_arch(device)
    progress.update("fetch", 0.0, f"fetching {opts.model}")
    loc, checkpoint = fetch_checkpoint(opts.model, progress)
    progress.update("fetch", 1.0, f"checkpoint at {checkpoint}")

    progress.update("load", 0.0, f"reading {checkpoint / CONFIG_NAME}")
    raw_config, model_config = read_checkpoint_config(checkpoint)
    check_weights(checkpoint)
    mode = conversion_mode(opts.quantization, checkpoint_quant_method(raw_config, model_config), opts.model)
    if mode == "mxfp4":  # the experts are converted, sharded and checked packed
        model_config = dataclasses.replace(model_config, quant=parse_quant(MXFP4_PACKED))
    if opts.expert_parallel:
        try:
            model_config = with_expert_parallel(model_config, True, opts.tensor_parallel_size)
        except ValueError as exc:
            raise BuildError(str(exc), INVALID_OPTIONS) from exc
    check_parallelism(model_config, opts.tensor_parallel_size, opts.pipeline_parallel_size)
    fingerprint = source_fingerprint(loc, checkpoint)
    draft = None
    if opts.draft_model is not None:
        draft, draft_fingerprint = fetch_draft(opts.draft_model, checkpoint, progress)
        fingerprint = hashlib.sha256(json.dumps([fingerprint, draft_fingerprint]).encode()).hexdigest()
    if target.remote:
        remote = remote_reusable(target, opts.model, fingerprint, gpu_arch, opts)
        if remote is not None:
            return reuse_outcome(target, remote[0], progress, digest=remote[1])
    else:
        existing = reusable(target, opts.model, fingerprint, gpu_arch, opts)
        if existing is not None:
            return reuse_outcome(target, existing, progress)
    out_config = output_config(raw_config, mode, opts.fp8_scales)
    progress.update(
        "load", 1.0, f"{model_config.architecture}, {model_config.num_hidden_layers} layers, mode {mode}"
    )

    from kiln_engine.build import convert

    tp, pp = opts.tensor_parallel_size, opts.pipeline_parallel_size
    with staging(target) as partial:
        progress.update("convert", 0.0, f"{mode}: tp={tp} pp={pp}")
        try:
            weight_files = convert.write_rank_shards(
                checkpoint, partial, model_config, mode=mode, tp=tp, pp=pp,
                per_channel=opts.fp8_scales == "channel", device=device,
                report=lambda f, m: progress.update("convert", f, f"{mode}: {m}"),
            )  # fmt: skip
        except (ValueError, KeyError) as exc:
            raise BuildError(f"cannot convert {opts.model}: {exc}", INVALID_CHECKPOINT) from exc
        progress.update("write", 0.0, "writing config.json")
        write_json_durably(partial / CONFIG_NAME, out_config)
        progress.update("write", 1.0, f"{sum(len(v) for v in weight_files.values())} weight files written")
        if draft is not None:  # still the write step: the tokenizer step follows it
            from kiln_engine.eagle import is_eagle_head, write_head

            if is_eagle_head(draft):
                write_head(draft, partial / DRAFT_DIR)
            else:
                shutil.copytree(draft, partial / DRAFT_DIR, ignore=shutil.ignore_patterns(".*"))
            progress.update("write", 1.0, f"draft model {opts.draft_model} carried in {DRAFT_DIR}/")
        progress.update("tokenizer", 0.0, "copying tokenizer files")
        copied = copy_tokenizer_files(checkpoint, partial)
        progress.update("tokenizer", 1.0, ", ".join(copied) or "no tokenizer files in the checkpoint")
        manifest = Manifest(
            runtime=runtime_info(),
            backend="torch",
            gpu_arch=gpu_arch,
            source=opts.model,
            source_fingerprint=fingerprint,
            architecture=model_config.architecture,
            config_hash=config_hash(out_config),
            quantization=opts.quantization,
            kv_cache_dtype=opts.kv_cache_dtype,
            dtype=serving_dtype(out_config),
            tensor_parallel_size=tp,
            pipeline_parallel_size=pp,
            expert_parallel=opts.expert_parallel,
            pipeline_stages=convert.pipeline_stages(model_config.num_hidden_layers, tp, pp),
            weight_files=weight_files,
            build_options=recorded_options(opts),
            files=[],
            created_at="",
        )
        capacity = None
        if not opts.measure_capacity:
            progress.update("capacity", 1.0, "skipped (--no-measure-capacity)")
        elif not measurable(opts):
            progress.update(
                "capacity", 1.0, "skipped: multi-rank artifacts are measured by their serving pods"
            )
        else:
            progress.update("capacity", 0.0, f"measuring on {device}")
            capacity = measure(partial, target.path, manifest, opts, device, progress)
        return finish_manifest(partial, manifest.model_copy(update={"capacity": capacity}), target, progress)


def measure(
    partial: Path, output: Path, manifest: Manifest, opts: BuildOptions, device: str, progress: Progress
) -> Capacity:
    """Load the artifact as it will be served and measure it.

    The loader tells artifacts by their manifest, which the partial directory must not have yet, so
    the engine loads a sibling view: links to the partial's files plus a provisional manifest.
    """
    from kiln_engine.backends import torch as torch_backend
    from kiln_engine.build.capacity import measure_capacity

    view = partial.parent / f".{output.name}.capacity-{uuid.uuid4().hex[:12]}"
    view.mkdir()
    try:
        for entry in partial.iterdir():
            (view / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
        write_manifest(view, manifest)
        started = time.monotonic()
        engine = torch_backend.engine_for_artifact_dir(view, dataclasses.replace(opts, device=device))
        progress.update("capacity", 0.05, f"loaded in {time.monotonic() - started:.1f}s")
        return measure_capacity(
            engine,
            vocab_size=engine.model_config.vocab_size,
            max_batch_size=opts.max_batch_size,
            ttft_target_ms=opts.ttft_target_ms,
            ttft_percentile=opts.ttft_percentile,
            measured_on=device_name(device),
            time_budget_s=opts.capacity_time_budget_s,
            report=lambda f, m: progress.update("capacity", 0.05 + 0.95 * f, m),
        )
    finally:
        shutil.rmtree(view, ignore_errors=True)
