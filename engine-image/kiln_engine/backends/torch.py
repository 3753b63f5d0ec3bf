"""The torch backend: Kiln's own serving core (`LLMEngine`) loaded from a checkpoint or an artifact,
wrapped as the `ServedModel` the HTTP server serves.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kiln_engine.build import source as src
from kiln_engine.build.manifest import MANIFEST_NAME, verify_artifact
from kiln_engine.config import EngineConfig
from kiln_engine.engine import LLMEngine
from kiln_engine.interface import Engine
from kiln_engine.server.app import ServedModel
from kiln_engine.tokenizer import Tokenizer

if TYPE_CHECKING:
    from kiln_engine.build.pipeline import BuildOptions


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_artifact(uri: str, verify: bool = True) -> Path:
    """A local, verified artifact directory for `uri` (a path, pvc:// or s3://, downloaded to /tmp)."""
    loc = src.parse_uri(uri)
    if loc.scheme in ("file", "pvc"):
        path = src.local_path(loc)
    elif loc.scheme == "s3":
        path = src.fetch(uri, Path(tempfile.gettempdir()) / "kiln-artifacts")
    else:
        raise src.SourceError(f"{uri}: an artifact is a path, pvc:// or s3:// location")
    if not (path / MANIFEST_NAME).is_file():
        raise src.SourceError(
            f"{path}: no {MANIFEST_NAME}; not a finished Kiln artifact (was the build interrupted?)"
        )
    if verify:
        verify_artifact(path)
    return path


def load_engine(path: Path, config: EngineConfig) -> LLMEngine:
    return LLMEngine(path, config)


def served_model(path: Path, name: str, config: EngineConfig, aliases: tuple[str, ...] = ()) -> ServedModel:
    """Load the engine and tokenizer for `path` (checkpoint or artifact) under the public `name`."""
    return served_model_for(load_engine(path, config), path, name, aliases)


def served_model_for(engine: Engine, path: Path, name: str, aliases: tuple[str, ...] = ()) -> ServedModel:
    """Wrap a loaded engine (an LLMEngine, or one rank 0 mirrors to TP followers) for the server."""
    local = getattr(engine, "engine", engine)  # LockstepEngine wraps the local LLMEngine
    assert isinstance(local, LLMEngine)
    tok = local.tokenizer if local.tokenizer is not None else Tokenizer.from_dir(path)
    return ServedModel(
        name=name,
        engine=engine,
        tokenizer=tok,
        eos_token_ids=local.eos_token_ids,
        vocab_size=local.model_config.vocab_size,
        chat_encode=lambda text: tok.encode(text, add_special_tokens=False),
        aliases=aliases,
        engine_detokenizes=local.tokenizer is not None,
        adapters=tuple(local.adapters),
        failed_adapters=local.failed_adapters,
    )


def artifact_tp(path: Path) -> int:
    """The tensor-parallel size an artifact was built for (1 for a checkpoint)."""
    manifest = path / MANIFEST_NAME
    if not manifest.is_file():
        return 1
    return int(json.loads(manifest.read_text()).get("tensor_parallel_size", 1))


def artifact_pp(path: Path) -> int:
    """The pipeline-parallel size an artifact was built for (1 for a checkpoint)."""
    manifest = path / MANIFEST_NAME
    if not manifest.is_file():
        return 1
    return int(json.loads(manifest.read_text()).get("pipeline_parallel_size", 1))


def artifact_kv_cache_dtype(path: Path) -> str:
    """The KV cache dtype an artifact was built for ("auto" for a checkpoint)."""
    manifest = path / MANIFEST_NAME
    if not manifest.is_file():
        return "auto"
    return str(json.loads(manifest.read_text()).get("kv_cache_dtype", "auto"))


def engine_for_artifact_dir(path: Path, opts: BuildOptions) -> LLMEngine:
    """The engine a build measures capacity with: the artifact as it will be served."""
    device = opts.device or default_device()
    config = EngineConfig(
        max_num_seqs=opts.max_batch_size,
        max_model_len=opts.max_seq_len,
        max_tokens_per_step=opts.max_num_tokens,
        device=device,
        cuda_graphs=device.startswith("cuda"),  # measure capacity the way `serve` runs on a GPU
        kv_cache_dtype=opts.kv_cache_dtype,
    )
    return LLMEngine(path, config)
