"""Multi-LoRA over the OpenAI API: `model` selects an adapter, /v1/models lists adapters with their
parent, an unknown name is refused naming `model`, requests are counted per adapter. Real uvicorn
on a loopback port, the real engine and the OpenAI client; `kiln-engine serve --lora` flags.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine
pytest.importorskip("torch")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from click.testing import CliRunner  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from kiln_engine import metric_names as mn  # noqa: E402
from kiln_engine.backends.torch import served_model  # noqa: E402
from kiln_engine.cli import main as cli_main  # noqa: E402
from kiln_engine.config import EngineConfig  # noqa: E402
from kiln_engine.engine import LLMEngine  # noqa: E402
from kiln_engine.interface import SamplingParams  # noqa: E402
from kiln_engine.lora_testing import make_tiny_adapter  # noqa: E402
from kiln_engine.server.app import ServerSettings, create_app  # noqa: E402
from kiln_engine.testing import make_tiny_checkpoint  # noqa: E402
from tests.engine.test_server import AppServer  # noqa: E402

MODEL = "tiny-llama"
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, list[tuple[str, str]]]]:
    d = tmp_path_factory.mktemp("lora-server")
    base = make_tiny_checkpoint(d / "base", "llama")
    loras = [(n, str(make_tiny_adapter(d / n, base, seed=s))) for n, s in (("a1", 1), ("a2", 2))]
    too_big = ("bad", str(make_tiny_adapter(d / "bad", base, rank=16)))  # above max_lora_rank
    config = EngineConfig(
        device="cpu", max_model_len=128, max_loras=1, max_lora_rank=8, lora_modules=[*loras, too_big]
    )
    with AppServer(create_app(served_model(base, MODEL, config), ServerSettings())) as served:
        yield served.url, base, loras


def offline_text(engine: LLMEngine, ids: list[int], adapter: str | None) -> str:
    """The engine's own detokenized greedy text (what the server streams: incomplete UTF-8 held back)."""
    engine.add_request(f"r-{adapter}", ids, SamplingParams(max_tokens=8, temperature=0, adapter=adapter))
    text = ""
    while engine.has_unfinished():
        text += "".join(out.text for out in engine.step())
    return text


def test_model_selects_the_adapter(setup: tuple[str, Path, list[tuple[str, str]]]) -> None:
    url, base, loras = setup
    offline = LLMEngine(base, EngineConfig(max_loras=2, max_lora_rank=8, lora_modules=loras))
    assert offline.tokenizer is not None
    ids = offline.tokenizer.encode(PROMPT)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    texts = set()
    for name, adapter in ((MODEL, None), ("base", None), ("a1", "a1"), ("a2", "a2")):
        got = client.completions.create(model=name, prompt=ids, max_tokens=8, temperature=0)
        assert got.choices[0].text == offline_text(offline, ids, adapter), name
        assert got.model == (adapter or MODEL)
        texts.add(got.choices[0].text)
    assert len(texts) == 3  # base (twice), a1, a2
    models = {m.id: m.model_dump() for m in client.models.list().data}
    assert set(models) == {MODEL, "a1", "a2"}
    assert models["a1"]["parent"] == MODEL and models[MODEL].get("parent") is None
    metrics = openai.DefaultHttpxClient().get(f"{url}/metrics").text
    counts = {
        s.labels["adapter"]: s.value
        for f in text_string_to_metric_families(metrics)
        for s in f.samples
        if s.name == mn.LORA_REQUESTS
    }
    assert counts == {"a1": 1.0, "a2": 1.0}


def test_unknown_model_is_refused_naming_the_param(setup: tuple[str, Path, list[tuple[str, str]]]) -> None:
    client = openai.OpenAI(base_url=f"{setup[0]}/v1", api_key="unused")
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="a3", messages=[{"role": "user", "content": "hi"}])
    body = err.value.body
    assert isinstance(body, dict) and body["param"] == "model"
    assert "'a3' does not exist" in body["message"] and "'a1', 'a2'" in body["message"]


def test_adapter_that_failed_to_load_is_refused_with_the_reason(
    setup: tuple[str, Path, list[tuple[str, str]]],
) -> None:
    client = openai.OpenAI(base_url=f"{setup[0]}/v1", api_key="unused")
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="bad", prompt="hi", max_tokens=2)
    body = err.value.body
    assert isinstance(body, dict) and body["param"] == "model"
    assert "'bad' is a LoRA adapter that failed to load" in body["message"]
    assert "field 'r' is 16, above this server's max LoRA rank 8" in body["message"]
    assert "bad" not in {m.id for m in client.models.list().data}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lora", "a1"], "expected name=path"),
        (["--lora", "base=/x"], "names the base model"),
        (["--lora", "a=/x", "--lora", "a=/y"], "must be unique"),
    ],
)
def test_serve_rejects_bad_lora_flags(tmp_path: Path, flags: list[str], message: str) -> None:
    result = CliRunner().invoke(cli_main, ["serve", "--model", str(tmp_path), *flags])
    assert result.exit_code == 2 and message in result.output
