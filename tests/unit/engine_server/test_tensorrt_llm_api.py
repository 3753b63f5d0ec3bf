"""Kiln's TensorRT-LLM calls against the API of the release the image pins (1.0), without TensorRT-LLM:
the surface in trtllm_api_surface.json (see tools/trtllm_api_surface.py) becomes a fake `tensorrt_llm`
whose classes take only the parameters and fields that release has, and Kiln's build runs against it;
the imports, trtllm-serve flags and extra-options keys Kiln writes are checked against the same surface.
"""

from __future__ import annotations

import ast
import enum
import importlib.machinery
import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from kiln_engine.backends import tensorrt_llm as trt

ROOT = Path(__file__).resolve().parents[3]
SURFACE = json.loads((Path(__file__).with_name("trtllm_api_surface.json")).read_text())
KILN_TRT_FILES = [
    ROOT / "engine-image/kiln_engine/backends/tensorrt_llm.py",
    ROOT / "engine-image/kiln_engine/build/trt.py",
]
CLASSES: dict[str, dict[str, Any]] = SURFACE["classes"]


def fields(name: str) -> set[str]:
    return set(CLASSES[name]["fields"])


def fake_class(name: str, calls: list[tuple[str, str, Any]]) -> type:
    """A class taking exactly what the release's `name` takes; its instances have only its methods."""
    spec = CLASSES[name]
    methods: dict[str, list[str]] = spec["methods"]
    init = methods.get("__init__", [])
    named = [p for p in init if not p.startswith("*")]
    accepted = set(named) | fields(name)
    if "**kwargs" in init:
        accepted |= fields(spec["kwargs_model"])

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if len(args) > len(named):
            raise TypeError(f"{name}() takes {len(named)} positional arguments, got {len(args)}")
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            raise TypeError(
                f"{name}() has no parameter or field {unknown} in TensorRT-LLM {SURFACE['release']}"
            )
        self.kwargs = kwargs
        calls.append((name, "__init__", kwargs))

    def method(meth: str, params: list[str]) -> Any:
        def call(self: Any, *args: Any, **kwargs: Any) -> None:
            if len(args) > len([p for p in params if not p.startswith("*")]) or set(kwargs) - set(params):
                raise TypeError(f"{name}.{meth}{tuple(params)} called with {args} {kwargs}")
            calls.append((name, meth, args))

        return call

    body = {m: method(m, p) for m, p in methods.items() if m != "__init__"}
    return type(spec["defined_as"], (), {"__init__": __init__, **body})


def fake_tensorrt_llm(calls: list[tuple[str, str, Any]]) -> dict[str, types.ModuleType]:
    """Modules exporting the release's names: its classes and enums faked, every other name a placeholder."""
    enums = {n: enum.Enum(n.rsplit(".", 1)[-1], m) for n, m in SURFACE["enums"].items()}
    modules = {}
    for module, names in SURFACE["modules"].items():
        mod = types.ModuleType(module)
        mod.__spec__ = importlib.machinery.ModuleSpec(module, None)
        for attr in names:
            qualified = f"{module}.{attr}"
            if qualified in CLASSES:
                value: Any = fake_class(qualified, calls)
            else:
                value = enums.get(qualified, object())
            setattr(mod, attr, value)
        modules[module] = mod
    return modules


OPTION_CASES = [
    trt.TrtOptions(quantization=q, kv_cache_dtype=kv, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                   max_seq_len=seq, prefix_caching=cache)
    for q in trt.QUANT_ALGO
    for kv, tp, pp, seq, cache in [("auto", 1, 1, None, True), ("fp8", 4, 2, 8192, False)]
]  # fmt: skip


@pytest.mark.parametrize("opts", OPTION_CASES, ids=lambda o: f"{o.quantization}-{o.kv_cache_dtype}")
def test_build_runs_against_the_pinned_release(
    opts: trt.TrtOptions, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, str, Any]] = []
    for name, module in fake_tensorrt_llm(calls).items():
        monkeypatch.setitem(sys.modules, name, module)
    trt.build_engine("/ckpt", tmp_path / "engine", opts)
    llm = "tensorrt_llm._tensorrt_engine.LLM"  # the TensorRT flow: the only LLM that builds and saves
    assert (llm, "save", (str(tmp_path / "engine"),)) in calls
    assert calls[-1][:2] == (llm, "shutdown")
    built = next(kw for n, m, kw in calls if (n, m) == (llm, "__init__"))
    assert built["tensor_parallel_size"] == opts.tensor_parallel_size
    assert built["pipeline_parallel_size"] == opts.pipeline_parallel_size
    quant = built.get("quant_config")
    algos = {k: v.name for k, v in quant.kwargs.items()} if quant is not None else {}
    assert algos.get("quant_algo") == trt.QUANT_ALGO[opts.quantization]
    assert algos.get("kv_cache_quant_algo") == trt.KV_CACHE[opts.kv_cache_dtype][1]


def tensorrt_llm_imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every `from tensorrt_llm… import name` in a file."""
    return [
        (node.module, alias.name)
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "tensorrt_llm"
        for alias in node.names
    ]


@pytest.mark.parametrize("path", KILN_TRT_FILES, ids=lambda p: p.name)
def test_every_name_kiln_imports_exists_in_the_release(path: Path) -> None:
    for module, name in tensorrt_llm_imports(path):
        assert module in SURFACE["modules"], f"{path.name}: module {module} is not in the surface"
        assert name in SURFACE["modules"][module], (
            f"{path.name}: {module} has no {name} in {SURFACE['release']}"
        )


def test_quantization_names_are_quant_algo_members() -> None:
    members = set(SURFACE["enums"]["tensorrt_llm.llmapi.QuantAlgo"])
    ours = {a for a in trt.QUANT_ALGO.values() if a} | {a for _, a in trt.KV_CACHE.values() if a}
    assert ours <= members, ours - members


def flags_in(function: str) -> set[str]:
    """The `--flag` literals a function of the backend module writes."""
    tree = ast.parse(KILN_TRT_FILES[0].read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)
    return {n.value for n in ast.walk(fn) if isinstance(n, ast.Constant) and str(n.value).startswith("--")}


def test_trtllm_serve_flags_exist_in_the_release() -> None:
    serve = SURFACE["commands"]["trtllm-serve"]
    assert flags_in("trtllm_serve_args") <= set(serve["options"]), flags_in("trtllm_serve_args") - set(
        serve["options"]
    )
    for engine_backend in ("tensorrt", "pytorch"):
        argv = trt.trtllm_serve_args("/m", trt.TrtOptions(max_seq_len=4096), host="h", port=1,
                                     extra_options_file="/x.yaml", tokenizer="/t",
                                     engine_backend=engine_backend)  # fmt: skip
        assert argv[argv.index("--backend") + 1] in serve["choices"]["--backend"]


@pytest.mark.parametrize(
    ("engine_backend", "args_model"), [("tensorrt", "TrtLlmArgs"), ("pytorch", "TorchLlmArgs")]
)
@pytest.mark.parametrize("opts", OPTION_CASES[:2], ids=["defaults", "fp8-kv"])
def test_extra_options_are_fields_of_that_flows_arguments(
    engine_backend: str, args_model: str, opts: trt.TrtOptions
) -> None:
    extra = trt.extra_llm_api_options(opts, engine_backend)
    assert set(extra) <= fields(args_model), set(extra) - fields(args_model)
    assert set(extra["kv_cache_config"]) <= fields("tensorrt_llm.llmapi.KvCacheConfig")


def test_serving_switches_on_the_iteration_stats_the_proxy_exports() -> None:
    """trtllm-serve's /metrics is empty unless the executor keeps iteration stats; the PyTorch flow keeps
    none without `enable_iter_perf_stats` (a field only its arguments have)."""
    torch_flow = trt.extra_llm_api_options(trt.TrtOptions(), "pytorch")
    engine_flow = trt.extra_llm_api_options(trt.TrtOptions(), "tensorrt")
    assert torch_flow["enable_iter_perf_stats"] is True
    assert torch_flow["iter_stats_max_iterations"] > 0 and engine_flow["iter_stats_max_iterations"] > 0
    assert (
        "enable_iter_perf_stats" not in fields("TrtLlmArgs") and "enable_iter_perf_stats" not in engine_flow
    )


def test_build_and_llm_api_kwargs_are_fields_of_the_release() -> None:
    for opts in OPTION_CASES:
        kw = trt.llm_api_kwargs("/ckpt", opts)
        assert set(kw) <= fields("TrtLlmArgs"), set(kw) - fields("TrtLlmArgs")
        assert set(kw["build_config"]) <= fields("tensorrt_llm.llmapi.BuildConfig")
        assert set(kw["kv_cache_config"]) <= fields("tensorrt_llm.llmapi.KvCacheConfig")
        assert set(kw.get("quant_config", {})) <= fields("tensorrt_llm.llmapi.QuantConfig")


def test_the_fake_rejects_what_the_release_lacks() -> None:
    """The check has teeth: a keyword or method 1.0 lacks fails, as Kiln's pre-1.0 build did."""
    calls: list[tuple[str, str, Any]] = []
    mods = fake_tensorrt_llm(calls)
    with pytest.raises(TypeError, match="enable_iter_perf_stats"):
        mods["tensorrt_llm._tensorrt_engine"].LLM(model="/m", enable_iter_perf_stats=True)
    torch_flow_llm = mods["tensorrt_llm"].LLM(model="/m")
    assert not hasattr(torch_flow_llm, "save")
