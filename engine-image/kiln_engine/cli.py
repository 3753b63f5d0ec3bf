"""`kiln-engine`: the engine image's command line (serve, build, measure-capacity, verify), both backends."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import traceback
from pathlib import Path

import click

from kiln_engine import __version__
from kiln_engine.backends import BACKENDS
from kiln_engine.config import SPECULATIVE_METHODS

QUANTIZATIONS = ("none", "bf16", "fp16", "fp8", "int8-weight", "int4-awq", "int4-gptq", "mxfp4")
KV_CACHE_DTYPES = ("auto", "bf16", "fp16", "fp8")


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"kiln-engine: error: {message}", err=True)
    sys.exit(code)


def read_api_key(api_key_file: str | None) -> str | None:
    """The bearer token clients must send: from --api-key-file, else $KILN_API_KEY, else none."""
    if api_key_file:
        try:
            key = Path(api_key_file).read_text().strip()
        except OSError as exc:
            raise click.UsageError(f"cannot read --api-key-file {api_key_file}: {exc}") from exc
        if not key:
            raise click.UsageError(f"--api-key-file {api_key_file} is empty")
        return key
    return os.environ.get("KILN_API_KEY") or None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="kiln-engine")
def main() -> None:
    """Kiln's engine runtime: build an artifact from a checkpoint, serve it over an OpenAI-compatible API."""


@main.command()
@click.option("--artifact", help="Built artifact: a directory, pvc://claim/path or s3://bucket/prefix.")
@click.option("--model", "model_dir", help="A Hugging Face checkpoint directory to serve as is.")
@click.option("--served-model-name", help="Name clients use in `model` (default: the directory name).")
@click.option("--host", default="0.0.0.0", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--api-key-file", type=click.Path(dir_okay=False), help="File with the bearer token (or $KILN_API_KEY)."
)
@click.option("--drain-timeout", default=30.0, show_default=True, type=click.FloatRange(0), help="Seconds.")
@click.option("--backend", type=click.Choice(BACKENDS), default="torch", show_default=True)
@click.option("--device", default=None, help="cpu or cuda[:N] (default: cuda when available).")
@click.option("--dtype", default="auto", show_default=True, help="auto, float32, bfloat16 or float16.")
@click.option("--max-num-seqs", "--max-batch-size", default=64, show_default=True, type=click.IntRange(1))
@click.option("--max-model-len", "--max-seq-len", default=None, type=click.IntRange(16))
@click.option("--max-num-tokens", default=2048, show_default=True, type=click.IntRange(16), help="Per step.")
@click.option("--block-size", default=16, show_default=True, type=click.IntRange(1))
@click.option("--num-kv-blocks", default=None, type=click.IntRange(1), help="Fix the KV cache size.")
@click.option("--gpu-memory-utilization", default=0.9, show_default=True, type=click.FloatRange(0.05, 1.0))
@click.option("--cpu-kv-cache-mb", default=256, show_default=True, type=click.IntRange(1))
@click.option("--prefix-caching/--no-prefix-caching", default=True, show_default=True)
@click.option("--chunked-prefill/--no-chunked-prefill", default=True, show_default=True)
@click.option("--kv-cache-dtype", type=click.Choice(KV_CACHE_DTYPES), default="auto", show_default=True)
@click.option(
    "--cuda-graphs/--no-cuda-graphs",
    default=None,
    help="Replay decode steps as CUDA graphs (default: on when serving on a GPU).",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--speculative",
    type=click.Choice(list(SPECULATIVE_METHODS)),
    default=None,
    help="Speculative decoding: ngram = prompt lookup, draft = a smaller model with the same tokenizer "
    "(--draft-model), eagle = an EAGLE head over the model's hidden states (--draft-model); one rank "
    "only; off by default.",
)
@click.option("--num-speculative-tokens", default=4, show_default=True, type=click.IntRange(1, 64))
@click.option(
    "--draft-model",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="The draft checkpoint (--speculative draft) or EAGLE head (--speculative eagle) directory.",
)
@click.option(
    "--lora",
    "loras",
    multiple=True,
    metavar="NAME=SOURCE",
    help="A PEFT LoRA adapter (a directory, pvc://, hf:// or s3://), served as model NAME next to the "
    "base model (repeatable).",
)
@click.option(
    "--lora-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help='LoRA adapters listed in a JSON file, {"adapters": [{"name": ..., "source": ...}]}, looked at '
    "again every --lora-poll-seconds: adapters added, replaced or removed there are served without a "
    "restart (the operator mounts its ConfigMap here). Not with --lora.",
)
@click.option("--lora-poll-seconds", default=5.0, show_default=True, type=click.FloatRange(0.1, 3600))
@click.option("--max-loras", default=4, show_default=True, type=click.IntRange(1, 256), help="Adapter slots.")
@click.option("--max-lora-rank", default=16, show_default=True, type=click.IntRange(1, 1024))
@click.option(
    "--tp",
    "tp",
    default=None,
    type=click.IntRange(1, 64),
    help="Tensor parallel ranks (default: the artifact's; rank 0 serves, the others follow).",
)
@click.option(
    "--pp",
    "pp",
    default=None,
    type=click.IntRange(1, 64),
    help="Pipeline parallel stages (default: the artifact's).",
)
@click.option(
    "--group-size",
    envvar="KILN_GROUP_SIZE",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Pods in this replica; the tp * pp ranks split evenly over them [env KILN_GROUP_SIZE].",
)
@click.option(
    "--group-index",
    envvar="KILN_GROUP_INDEX",
    default=0,
    show_default=True,
    type=click.IntRange(0, 63),
    help="This pod's place in the replica; 0 serves the API, others only /health [env KILN_GROUP_INDEX].",
)
@click.option(
    "--leader-address",
    envvar="KILN_LEADER_ADDRESS",
    default=None,
    help="Host name of pod 0, where the ranks meet [env KILN_LEADER_ADDRESS].",
)
@click.option(
    "--rendezvous-port",
    envvar="KILN_RENDEZVOUS_PORT",
    default=29500,
    show_default=True,
    type=click.IntRange(1, 65535),
    help="Port on the leader where the ranks meet [env KILN_RENDEZVOUS_PORT].",
)
@click.option("--verify/--no-verify", default=True, show_default=True, help="Check artifact checksums first.")
@click.option("--log-level", default="info", show_default=True)
def serve(
    artifact: str | None,
    model_dir: str | None,
    served_model_name: str | None,
    host: str,
    port: int,
    api_key_file: str | None,
    drain_timeout: float,
    backend: str,
    device: str | None,
    dtype: str,
    max_num_seqs: int,
    max_model_len: int | None,
    max_num_tokens: int,
    block_size: int,
    num_kv_blocks: int | None,
    gpu_memory_utilization: float,
    cpu_kv_cache_mb: int,
    prefix_caching: bool,
    chunked_prefill: bool,
    kv_cache_dtype: str,
    cuda_graphs: bool | None,
    seed: int,
    speculative: str | None,
    num_speculative_tokens: int,
    draft_model: Path | None,
    loras: tuple[str, ...],
    lora_file: Path | None,
    lora_poll_seconds: float,
    max_loras: int,
    max_lora_rank: int,
    tp: int | None,
    pp: int | None,
    group_size: int,
    group_index: int,
    leader_address: str | None,
    rendezvous_port: int,
    verify: bool,
    log_level: str,
) -> None:
    """Serve a model over the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models)."""
    if bool(artifact) == bool(model_dir):
        raise click.UsageError("give exactly one of --artifact or --model")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_key = read_api_key(api_key_file)
    if loras and lora_file is not None:
        raise click.UsageError("give the adapters with --lora or --lora-file, not both")
    if (loras or lora_file is not None) and backend == "tensorrt-llm":
        raise click.UsageError("--lora and --lora-file are served by the torch backend only")
    if backend == "tensorrt-llm":
        _serve_tensorrt_llm(artifact, model_dir, served_model_name, host, port, max_num_seqs, max_model_len,
                            max_num_tokens, prefix_caching, chunked_prefill, kv_cache_dtype,
                            gpu_memory_utilization, api_key, drain_timeout, verify)  # fmt: skip
        return
    from kiln_engine.backends import torch as torch_backend
    from kiln_engine.build.source import SourceError
    from kiln_engine.config import EngineConfig
    from kiln_engine.server import group, lockstep
    from kiln_engine.server.app import ServerSettings, serve_model
    from kiln_engine.server.drain import DrainRequest

    follower = os.environ.get(lockstep.FOLLOWER_ENV) == "1"
    try:
        path = (
            torch_backend.resolve_artifact(artifact, verify and not follower)
            if artifact
            else Path(str(model_dir))
        )
    except (SourceError, OSError, RuntimeError) as exc:
        _fail(str(exc), 1)
    if not path.is_dir():
        _fail(f"{path} is not a directory", 1)
    if tp is None:
        tp = torch_backend.artifact_tp(path) if artifact else 1
    if pp is None:
        pp = torch_backend.artifact_pp(path) if artifact else 1
    if kv_cache_dtype == "auto" and artifact:  # the dtype the artifact was built (and measured) with
        kv_cache_dtype = torch_backend.artifact_kv_cache_dtype(path)
    if speculative and tp * pp > 1:
        raise click.UsageError("--speculative runs on one rank only: not with --tp or --pp above 1")
    if speculative in ("draft", "eagle") and draft_model is None and artifact:  # the one the build carried
        from kiln_engine.draft import DRAFT_DIR

        carried = Path(path) / DRAFT_DIR
        draft_model = carried if carried.is_dir() else None
    if (speculative in ("draft", "eagle")) != (draft_model is not None):
        raise click.UsageError(
            "--draft-model goes with --speculative draft or eagle, which need it (or an artifact built "
            "with one)"
        )
    _check_draft_kind(speculative, draft_model)
    lora_file_text, lora_modules, lora_failed = _adapters_at_start(loras, lora_file, pp)
    try:
        layout = group.group_layout(tp * pp, group_size, group_index)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if group_size > 1 and not leader_address:
        raise click.UsageError("a replica of several pods needs --leader-address (or KILN_LEADER_ADDRESS)")
    world = int(os.environ.get("WORLD_SIZE", "0") or 0)
    followers: list[subprocess.Popen[bytes]] = []
    if layout.world > 1 and world == 0:  # not started by torchrun: start this pod's other ranks ourselves
        multi_pod = group_size > 1
        addr = leader_address or "" if multi_pod else "127.0.0.1"
        port_ = rendezvous_port if multi_pod else lockstep.free_port()
        followers = group.spawn_local_ranks(layout, addr, port_, sys.argv[1:], lockstep.FOLLOWER_ENV)
    elif layout.world > 1 and world != layout.world:
        _fail(f"WORLD_SIZE is {world} but tensor x pipeline parallelism is {tp} x {pp}")
    rank = int(os.environ.get("RANK", "0") or 0) if layout.world > 1 else 0
    pp_rank, tp_rank = group.rank_coordinates(rank, tp)
    name = served_model_name or path.resolve().name
    serve_device = device or torch_backend.default_device()
    if serve_device == "cuda" and layout.world > 1:  # one GPU per rank of this pod
        serve_device = f"cuda:{rank - layout.local_ranks.start}"
    if pp > 1 and cuda_graphs:
        _fail("--cuda-graphs covers the whole model in one graph: not available with pipeline parallelism")
    config = EngineConfig(
        max_num_seqs=max_num_seqs,
        max_model_len=max_model_len,
        max_tokens_per_step=max_num_tokens,
        block_size=block_size,
        num_kv_blocks=num_kv_blocks,
        gpu_memory_utilization=gpu_memory_utilization,
        cpu_kv_cache_bytes=cpu_kv_cache_mb * 1024 * 1024,
        prefix_caching=prefix_caching,
        chunked_prefill=chunked_prefill,
        dtype=dtype,
        kv_cache_dtype=kv_cache_dtype,
        device=serve_device,
        cuda_graphs=serve_device.startswith("cuda") and pp == 1 if cuda_graphs is None else cuda_graphs,
        seed=seed,
        speculative=speculative,
        num_speculative_tokens=num_speculative_tokens,
        draft_model=str(draft_model) if draft_model is not None else None,
        lora_modules=lora_modules,
        max_loras=max_loras if lora_modules or lora_file is not None else 0,
        max_lora_rank=max_lora_rank,
        tensor_parallel_size=tp,
        tensor_parallel_rank=tp_rank,
        pipeline_parallel_size=pp,
        pipeline_parallel_rank=pp_rank,
    )
    health = None
    if rank > 0:
        lockstep.ignore_termination_signals()
        if rank == layout.local_ranks.start:  # the first rank of a follower pod answers its probes
            health = group.HealthServer(host, port, layout.local_ranks)
    liveness = None
    drain_request = DrainRequest()  # rank 0's server drains when a follower pod of its group leaves
    if layout.world > 1:
        lockstep.join_group(rank, layout.world, serve_device)
        on_leave = drain_request.ask if rank == 0 else None
        liveness = group.Liveness(rank, layout.world, followers, on_leave=on_leave)
        if 0 < rank == layout.local_ranks.start:  # a follower pod's first rank gets the pod's SIGTERM
            group.leave_on_termination(liveness)
    try:
        engine = torch_backend.load_engine(path, config)
    except (ValueError, FileNotFoundError) as exc:
        _fail(f"cannot load {path}: {exc}", 1)
    runner = engine.runner
    graphs = sorted(runner.decode_graphs.graphs) if runner.decode_graphs else []
    click.echo(
        f"kiln-engine: rank {rank} (stage {pp_rank}, tp rank {tp_rank}) loaded {path} on {runner.device}: "
        f"{runner.num_blocks} KV blocks of {runner.block_size} tokens, "
        f"CUDA-graph decode batch sizes {graphs or 'none (eager)'}",
        err=True,
    )
    if layout.world > 1:
        control = lockstep.control_group()  # returns once every rank has loaded
        if health is not None:
            health.ready.set()
        if rank > 0:
            lockstep.follow(engine, control)
            if liveness is not None:
                liveness.stop()
            _wait_for(followers)
            return
        engine = lockstep.LockstepEngine(  # type: ignore[assignment]
            engine, control, liveness.stop if liveness else None, liveness.fail if liveness else None
        )
    model = torch_backend.served_model_for(engine, path, name)
    model.failed_adapters = {**lora_failed, **model.failed_adapters}
    if lora_file is not None:
        model.adapter_file, model.adapter_file_text = lora_file, lora_file_text
        model.adapter_poll_s = lora_poll_seconds
    settings = ServerSettings(api_key=api_key, drain_timeout_s=drain_timeout)
    try:
        serve_model(model, settings, host, port, log_level.lower(), drain_request)
    finally:
        _wait_for(followers)


def _lora_modules(specs: tuple[str, ...], pp: int) -> list[tuple[str, str]]:
    """--lora NAME=SOURCE flags -> (name, source) pairs, names valid and unique."""
    from kiln_engine.lora import AdapterError, parse_lora_spec

    try:
        modules = [parse_lora_spec(s) for s in specs]
    except AdapterError as exc:
        raise click.UsageError(str(exc)) from None
    names = [n for n, _ in modules]
    if len(set(names)) != len(names):
        raise click.UsageError(f"--lora names must be unique, got {names}")
    if modules and pp > 1:
        raise click.UsageError("--lora is not available with pipeline parallelism (--pp above 1)")
    return modules


def _check_draft_kind(speculative: str | None, draft_model: Path | None) -> None:
    """Refuse an EAGLE head served as a draft model and a draft model served as a head."""
    if draft_model is None:
        return
    from kiln_engine.eagle import is_eagle_head

    head = is_eagle_head(draft_model)
    if head != (speculative == "eagle"):
        kind = "an EAGLE head" if head else "a draft model, not an EAGLE head"
        raise click.UsageError(
            f"{draft_model} is {kind}: serve it with --speculative {'eagle' if head else 'draft'}"
        )


def _adapters_at_start(
    loras: tuple[str, ...], lora_file: Path | None, pp: int
) -> tuple[str | None, list[tuple[str, str]], dict[str, str]]:
    """The adapter file's content (None without one), the adapters to load (name, local directory), and
    those of the file that could not be fetched (they are reported, the rest served). A --lora that
    cannot be fetched ends the process: the command line is wrong."""
    from kiln_engine.lora import AdapterError
    from kiln_engine.server.lora_watch import fetch_adapters, read_adapter_file

    if lora_file is None:
        modules = _lora_modules(loras, pp)
        fetched, failed = fetch_adapters(modules)
        if failed:
            _fail(f"cannot fetch LoRA adapter: {'; '.join(failed.values())}", 1)
        return None, fetched, {}
    if pp > 1:
        raise click.UsageError("--lora-file is not available with pipeline parallelism (--pp above 1)")
    try:
        text = lora_file.read_text()
        modules = read_adapter_file(lora_file)
    except (AdapterError, OSError) as exc:
        _fail(f"--lora-file: {exc}", 1)
        raise  # unreachable: _fail exits
    fetched, failed = fetch_adapters(modules)
    return text, fetched, failed


def _wait_for(procs: list[subprocess.Popen[bytes]]) -> None:
    """Let this pod's other ranks exit after rank 0 told them to stop (killed after 30 s)."""
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _serve_tensorrt_llm(
    artifact: str | None,
    model_dir: str | None,
    served_model_name: str | None,
    host: str,
    port: int,
    max_num_seqs: int,
    max_model_len: int | None,
    max_num_tokens: int,
    prefix_caching: bool,
    chunked_prefill: bool,
    kv_cache_dtype: str,
    gpu_memory_utilization: float,
    api_key: str | None,
    drain_timeout: float,
    verify: bool,
) -> None:
    from kiln_engine.backends import tensorrt_llm as trt

    if not trt.available():
        _fail(trt.IMAGE_HINT, 3)
    target = _trt_engine_artifact(artifact, verify) if artifact else Path(str(model_dir))
    opts = trt.TrtOptions(
        max_batch_size=max_num_seqs,
        max_seq_len=max_model_len,
        max_num_tokens=max_num_tokens,
        kv_cache_dtype=kv_cache_dtype,
        prefix_caching=prefix_caching,
        chunked_prefill=chunked_prefill,
        kv_cache_free_gpu_memory_fraction=gpu_memory_utilization,
    )
    name = served_model_name or target.resolve().name
    if artifact:  # a TensorRT engine built by `build --backend tensorrt-llm`
        from kiln_engine.build.manifest import read_manifest

        manifest = read_manifest(target)
        opts = dataclasses.replace(
            opts,
            tensor_parallel_size=manifest.tensor_parallel_size,
            pipeline_parallel_size=manifest.pipeline_parallel_size,
        )
        model, tokenizer, engine_backend = str(target / "engine"), str(target), "tensorrt"
    else:  # a Hugging Face checkpoint, served by TensorRT-LLM's PyTorch path
        model, tokenizer, engine_backend = str(target), None, "pytorch"
    trt.serve(
        model, opts, served_model_name=name, host=host, port=port, tokenizer=tokenizer,
        engine_backend=engine_backend, api_key=api_key, drain_timeout_s=drain_timeout,
    )  # fmt: skip


def _trt_engine_artifact(artifact: str, verify: bool) -> Path:
    """A TensorRT-LLM artifact resolved (path, pvc://, s3://) and checksum-verified like a torch one."""
    from kiln_engine.backends.torch import resolve_artifact
    from kiln_engine.build.manifest import VerificationError, read_manifest
    from kiln_engine.build.source import SourceError

    try:
        path = resolve_artifact(artifact, verify)
        backend = read_manifest(path).backend
    except (SourceError, VerificationError, OSError, RuntimeError) as exc:
        _fail(str(exc), 1)
    if backend != "tensorrt-llm":
        _fail(f"{artifact} was built for --backend {backend}, not tensorrt-llm", 1)
    return path


@main.command()
@click.option(
    "--model", required=True, help="Checkpoint: a directory, pvc://claim/path, hf://org/name@rev, s3://…"
)
@click.option("--output", required=True, help="Artifact destination: a directory, pvc://claim/path or s3://…")
@click.option("--backend", type=click.Choice(BACKENDS), default="torch", show_default=True)
@click.option("--quantization", type=click.Choice(QUANTIZATIONS), default="none", show_default=True)
@click.option(
    "--tp", "tp", default=1, show_default=True, type=click.IntRange(1, 64), help="Tensor parallel size."
)
@click.option(
    "--pp", "pp", default=1, show_default=True, type=click.IntRange(1, 64), help="Pipeline parallel size."
)
@click.option("--kv-cache-dtype", type=click.Choice(KV_CACHE_DTYPES), default="auto", show_default=True)
@click.option("--max-batch-size", default=64, show_default=True, type=click.IntRange(1))
@click.option("--max-seq-len", default=None, type=click.IntRange(16))
@click.option("--max-num-tokens", default=2048, show_default=True, type=click.IntRange(16))
@click.option("--gpu-arch", default=None, help="e.g. sm90; default: the local GPU's, or cpu.")
@click.option("--measure-capacity/--no-measure-capacity", default=True, show_default=True)
@click.option("--ttft-target-ms", default=500.0, show_default=True, type=click.FloatRange(min=1))
@click.option(
    "--ttft-percentile",
    default="90",
    show_default=True,
    type=click.Choice(["50", "90", "95", "99"]),
    help="The TTFT percentile the target holds at when measuring capacity (the deployment's target).",
)
@click.option(
    "--capacity-budget-seconds",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=1),
    help="Wall-clock bound on the capacity measurement: no probe starts that would overrun it (by "
    "the largest probe so far); the answer keeps what was measured.",
)
@click.option("--device", default=None, help="Device to measure capacity on (default: cuda when available).")
@click.option(
    "--fp8-scales",
    type=click.Choice(("channel", "tensor")),
    default="channel",
    show_default=True,
    help="fp8 weight scales: one per output channel, or one per tensor.",
)
@click.option(
    "--progress-bar/--no-progress-bar", default=None, help="Human progress bar (default: on a TTY)."
)
@click.option(
    "--result-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the outcome as one JSON object (< 4 KiB) here, e.g. /dev/termination-log.",
)
@click.option(
    "--draft-model",
    default=None,
    help="A draft checkpoint for speculative decoding (same sources as --model, same tokenizer), "
    "carried in the artifact and served with `serve --speculative draft`; or an EAGLE head, served "
    "with `serve --speculative eagle`.",
)
@click.option(
    "--expert-parallel",
    is_flag=True,
    help="Mixture-of-experts models: each of the --tp ranks holds experts / tp experts whole "
    "instead of a slice of every expert.",
)
def build(
    model: str,
    output: str,
    backend: str,
    quantization: str,
    tp: int,
    pp: int,
    kv_cache_dtype: str,
    max_batch_size: int,
    max_seq_len: int | None,
    max_num_tokens: int,
    gpu_arch: str | None,
    measure_capacity: bool,
    ttft_target_ms: float,
    ttft_percentile: str,
    capacity_budget_seconds: float,
    device: str | None,
    fp8_scales: str,
    progress_bar: bool | None,
    result_file: str | None,
    draft_model: str | None,
    expert_parallel: bool,
) -> None:
    """Build an artifact: fetch, quantize, shard, measure capacity, publish with a manifest (written last)."""
    from kiln_engine.build import result
    from kiln_engine.build.pipeline import BuildError, BuildOptions, build_artifact
    from kiln_engine.build.progress import Progress

    def finish_failed(reason: str, message: str) -> None:
        progress.failed(message, reason=reason)
        if result_file:
            result.write(result_file, result.failure(reason, message))
        _fail(message, 1)

    progress = Progress(bar=progress_bar)
    opts = BuildOptions(
        model=model,
        output=output,
        backend=backend,
        quantization=quantization,
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        kv_cache_dtype=kv_cache_dtype,
        max_batch_size=max_batch_size,
        max_seq_len=max_seq_len,
        max_num_tokens=max_num_tokens,
        gpu_arch=gpu_arch,
        measure_capacity=measure_capacity,
        ttft_target_ms=ttft_target_ms,
        ttft_percentile=int(ttft_percentile),
        capacity_time_budget_s=capacity_budget_seconds,
        device=device,
        fp8_scales=fp8_scales,
        draft_model=draft_model,
        expert_parallel=expert_parallel,
    )
    if backend == "tensorrt-llm":
        from kiln_engine.build.trt import build_trt_artifact

        runner = build_trt_artifact
    else:
        runner = build_artifact
    # SIGTERM (Job deleted, deadline passed) unwinds the build: partial output removed, result written.
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupted) if in_main else None
    try:
        outcome = runner(opts, progress)
    except BuildError as exc:
        finish_failed(exc.reason, str(exc))
        return
    except Exception as exc:  # a bug or an unforeseen failure: keep the traceback in the log
        traceback.print_exc()
        finish_failed("BuildFailed", f"{type(exc).__name__}: {exc}")
        return
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    if result_file:
        m = outcome.manifest
        result.write(
            result_file,
            result.success(outcome.uri, outcome.manifest_sha256, m.runtime.version, m.gpu_arch, m.capacity),
        )
    click.echo(f"artifact: {outcome.uri if output.startswith('s3://') else outcome.path}")


def _raise_interrupted(signum: int, frame: object) -> None:
    from kiln_engine.build.pipeline import BuildError

    raise BuildError(f"interrupted by signal {signal.Signals(signum).name}", "Interrupted")


@main.command("measure-capacity")
@click.option("--url", required=True, help="The serving replica's API, e.g. http://<leader pod IP>:8000.")
@click.option(
    "--max-batch-size", default=64, show_default=True, type=click.IntRange(1), help="Largest burst."
)
@click.option("--ttft-target-ms", default=500.0, show_default=True, type=click.FloatRange(min=1))
@click.option(
    "--ttft-percentile", default="90", show_default=True, type=click.Choice(["50", "90", "95", "99"])
)
@click.option("--capacity-budget-seconds", default=300.0, show_default=True, type=click.FloatRange(min=1))
@click.option("--wait-seconds", default=120.0, show_default=True, type=click.FloatRange(min=0),
              help="How long to wait for the replica to answer /v1/models.")  # fmt: skip
@click.option("--token-range", default=256, show_default=True, type=click.IntRange(2),
              help="Prompt token ids come from [0, N): keep N inside the vocabulary.")  # fmt: skip
@click.option(
    "--api-key-file", type=click.Path(dir_okay=False), help="File with the bearer token (or $KILN_API_KEY)."
)
@click.option("--result-file", type=click.Path(dir_okay=False), default=None,
              help="Write the outcome as one JSON object (< 4 KiB) here.")  # fmt: skip
def measure_capacity_command(
    url: str,
    max_batch_size: int,
    ttft_target_ms: float,
    ttft_percentile: str,
    capacity_budget_seconds: float,
    wait_seconds: float,
    token_range: int,
    api_key_file: str | None,
    result_file: str | None,
) -> None:
    """Measure a serving replica's capacity over HTTP, by the build's method (for engines the build
    cannot measure: several ranks or pods, TensorRT-LLM)."""
    from kiln_engine.build import result
    from kiln_engine.build.capacity_http import ReplicaError, discover, measure_replica

    try:
        replica = discover(url, read_api_key(api_key_file), wait_seconds)
        capacity = measure_replica(
            replica,
            max_batch_size=max_batch_size,
            ttft_target_ms=ttft_target_ms,
            ttft_percentile=int(ttft_percentile),
            time_budget_s=capacity_budget_seconds,
            token_range=token_range,
        )
    except ReplicaError as exc:
        if result_file:
            result.write(result_file, result.failure("ReplicaUnavailable", str(exc)))
        _fail(str(exc), 1)
        return
    if result_file:
        result.write(result_file, result.measured(capacity))
    click.echo(json.dumps(capacity.model_dump()))


@main.command()
@click.argument("artifact")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest summary as JSON.")
def verify(artifact: str, as_json: bool) -> None:
    """Check an artifact's files against its manifest's checksums (exit 1 if anything is off)."""
    from kiln_engine.build import source as src
    from kiln_engine.build.manifest import MANIFEST_NAME, VerificationError, sha256_file, verify_artifact

    try:
        loc = src.parse_uri(artifact)
        # s3:// is downloaded to the work dir, then checked like a local directory
        path = src.fetch(artifact, src.work_dir()) if loc.scheme == "s3" else src.local_path(loc)
        manifest = verify_artifact(path)
    except (VerificationError, src.SourceError) as exc:
        _fail(str(exc), 1)
    summary = {
        "artifact": str(path),
        "ok": True,
        "manifest_sha256": sha256_file(path / MANIFEST_NAME),
        "files": len(manifest.files),
        "size_bytes": sum(f.size for f in manifest.files),
        "backend": manifest.backend,
        "gpu_arch": manifest.gpu_arch,
        "quantization": manifest.quantization,
        "tensor_parallel_size": manifest.tensor_parallel_size,
        "pipeline_parallel_size": manifest.pipeline_parallel_size,
        "capacity": manifest.capacity.model_dump() if manifest.capacity else None,
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(
            f"ok: {summary['files']} files, {summary['size_bytes']} bytes, "
            f"manifest {summary['manifest_sha256']}"
        )


if __name__ == "__main__":  # pragma: no cover
    main()
