"""tools/trtllm_api_surface.py on a small TensorRT-LLM-shaped source tree: what it reads (fields across
same-file bases, `as` names, click options and choices with aliases) and that its output has the shape
of the committed surface, so a regenerated file drops in for the transcribed one."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
TOOL = ROOT / "tools/trtllm_api_surface.py"
_spec = importlib.util.spec_from_file_location("trtllm_api_surface", TOOL)
assert _spec is not None and _spec.loader is not None
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)

SOURCES = {
    "tensorrt_llm/version.py": '__version__ = "1.0.0"\n',
    "tensorrt_llm/__init__.py": "from .llmapi import LLM\nfrom .version import __version__\n",
    "tensorrt_llm/_tensorrt_engine/__init__.py": "from tensorrt_llm.llmapi.llm import _TrtLLM as LLM\n",
    "tensorrt_llm/llmapi/__init__.py": "from .llm import LLM\nfrom .utils import BuildConfig, QuantAlgo\n",
    "tensorrt_llm/llmapi/llm.py": """
class BaseLLM:
    def __init__(self, model, tokenizer=None, **kwargs): ...
    def shutdown(self): ...
    def _build_model(self): ...
class _TrtLLM(BaseLLM):
    def save(self, engine_dir: str) -> None: ...
class _TorchLLM(BaseLLM): ...
class LLM(_TorchLLM): ...
""",
    "tensorrt_llm/llmapi/llm_args.py": """
from typing import ClassVar
class StrictBaseModel:
    model_config: ClassVar[dict] = {}
class KvCacheConfig(StrictBaseModel):
    enable_block_reuse: bool = True
    dtype: str = "auto"
class BaseLlmArgs(StrictBaseModel):
    model: str
    _private: int = 0
    max_batch_size: int | None = None
class TrtLlmArgs(BaseLlmArgs):
    build_config: object = None
class TorchLlmArgs(BaseLlmArgs):
    enable_iter_perf_stats: bool = False
""",
    "tensorrt_llm/builder.py": "class BuildConfig:\n    max_batch_size: int = 8\n    max_num_tokens: int\n",
    "tensorrt_llm/models/modeling_utils.py": "class QuantConfig:\n    quant_algo: object = None\n",
    "tensorrt_llm/quantization/mode.py": "class QuantAlgo:\n    FP8 = 1\n    W8A16 = 2\n    def f(x): ...\n",
    "tensorrt_llm/commands/serve.py": """
import click
@click.command("serve")
@click.argument("model", type=str)
@click.option("--tp_size", type=int, default=1)
@click.option("--backend", type=ChoiceWithAlias(["pytorch", "tensorrt"], {"trt": "tensorrt"}))
@click.option("--config", "--extra_llm_api_options", "extra_llm_api_options", type=str)
def serve(model, tp_size, backend, extra_llm_api_options): ...
""",
}


def write_tree(root: Path) -> Path:
    for rel, text in SOURCES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_surface_of_a_source_tree(tmp_path: Path) -> None:
    s = tool.surface(tool.dir_reader(write_tree(tmp_path)), {"tree": "t"})
    assert s["release"] == "1.0.0"
    assert s["modules"]["tensorrt_llm._tensorrt_engine"] == ["LLM"]
    assert {"BuildConfig", "QuantAlgo", "LLM"} <= set(s["modules"]["tensorrt_llm.llmapi"])
    trt_llm = s["classes"]["tensorrt_llm._tensorrt_engine.LLM"]
    assert trt_llm["defined_as"] == "_TrtLLM" and trt_llm["kwargs_model"] == "TrtLlmArgs"
    assert trt_llm["methods"]["save"] == ["engine_dir"]
    assert trt_llm["methods"]["__init__"] == ["model", "tokenizer", "**kwargs"]
    assert "_build_model" not in trt_llm["methods"]
    assert "save" not in s["classes"]["tensorrt_llm.LLM"]["methods"]
    assert s["classes"]["TrtLlmArgs"]["fields"] == ["build_config", "max_batch_size", "model"]
    assert "enable_iter_perf_stats" in s["classes"]["TorchLlmArgs"]["fields"]
    assert s["classes"]["tensorrt_llm.llmapi.KvCacheConfig"]["fields"] == ["dtype", "enable_block_reuse"]
    assert s["enums"]["tensorrt_llm.llmapi.QuantAlgo"] == ["FP8", "W8A16"]
    serve = s["commands"]["trtllm-serve"]
    assert serve["arguments"] == ["model"]
    assert serve["options"] == ["--backend", "--config", "--extra_llm_api_options", "--tp_size"]
    assert serve["choices"] == {"--backend": ["pytorch", "tensorrt", "trt"]}


def test_reads_a_git_ref_and_matches_the_committed_surface_shape(tmp_path: Path) -> None:
    repo = write_tree(tmp_path / "src")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "v"], check=True)
    subprocess.run([*git, "tag", "v1.0.0"], check=True)
    out = subprocess.run(
        [sys.executable, str(TOOL), str(repo / ".git"), "v1.0.0"], check=True, capture_output=True, text=True
    ).stdout
    generated = json.loads(out)
    assert generated["source"]["ref"] == "v1.0.0" and len(generated["source"]["commit"]) == 40
    committed = json.loads((Path(__file__).with_name("trtllm_api_surface.json")).read_text())
    assert set(generated) == set(committed)
    for section in ("modules", "classes", "enums", "commands"):
        assert set(generated[section]) == set(committed[section]), section
    for name, cls in generated["classes"].items():
        assert set(cls) == set(committed["classes"][name]), name
    assert set(generated["commands"]["trtllm-serve"]) == set(committed["commands"]["trtllm-serve"])
