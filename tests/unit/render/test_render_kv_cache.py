"""An fp8 KV cache asked for in an LLMDeployment reaches the engine's build and serve commands, as
their own option parsers read the rendered arguments, for the torch backend as for TensorRT-LLM."""

from __future__ import annotations

from typing import Any

import pytest
from render_helpers import engine_for, example, ready

from kiln.render import build_job as render_build
from kiln.render import serving as render_serving
from kiln.render.common import Settings
from kiln_engine.cli import build as build_command
from kiln_engine.cli import serve as serve_command


def _params(command: Any, args: list[str]) -> dict[str, Any]:
    assert args[0] == command.name
    return dict(command.make_context(command.name, args[1:]).params)


@pytest.mark.parametrize("backend", ["torch", "tensorrt-llm"])
def test_fp8_kv_cache_reaches_build_and_serve(backend: str) -> None:
    deployment = example("llama-3-8b-fp8-h100.yaml", engine={"backend": backend, "kvCacheDtype": "fp8"})
    build = _params(build_command, render_build.build_args(engine_for(deployment), Settings()))
    assert (build["backend"], build["kv_cache_dtype"]) == (backend, "fp8")
    inputs = render_serving.ServingInputs(deployment, ready(deployment), None, Settings())
    assert _params(serve_command, render_serving.engine_args(inputs))["kv_cache_dtype"] == "fp8"


def test_the_kv_cache_dtype_is_part_of_the_engine_key() -> None:
    fp8, bf16 = (example("llama-3-8b-fp8-h100.yaml", engine={"kvCacheDtype": kv}) for kv in ("fp8", "bf16"))
    assert engine_for(fp8).spec.key != engine_for(bf16).spec.key
