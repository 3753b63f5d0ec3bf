"""LoRA adapters added, replaced and removed while the engine serves (`--lora-file`, the ConfigMap the
operator mounts): a request in flight finishes on the version it started with, new requests get the
new set, /v1/models follows the file, a bad file or adapter changes nothing else. The real engine on
the tiny checkpoint; the server under real uvicorn on loopback with the OpenAI client.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine
pytest.importorskip("torch")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from click.testing import CliRunner  # noqa: E402

from kiln_engine.backends.torch import served_model  # noqa: E402
from kiln_engine.cli import main as cli_main  # noqa: E402
from kiln_engine.config import EngineConfig  # noqa: E402
from kiln_engine.engine import LLMEngine  # noqa: E402
from kiln_engine.interface import SamplingParams  # noqa: E402
from kiln_engine.lora import AdapterError  # noqa: E402
from kiln_engine.lora_testing import make_tiny_adapter  # noqa: E402
from kiln_engine.server import lora_watch  # noqa: E402
from kiln_engine.server.app import ServerSettings, create_app  # noqa: E402
from kiln_engine.server.lora_watch import AdapterFileWatch, read_adapter_file  # noqa: E402
from kiln_engine.testing import make_tiny_checkpoint  # noqa: E402
from tests.engine.test_server import AppServer  # noqa: E402

MODEL = "tiny-llama"
PROMPT_IDS = [5, 17, 42, 9, 3, 77]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    d = tmp_path_factory.mktemp("lora-reload")
    base = make_tiny_checkpoint(d / "base", "llama")
    adapters = {n: str(make_tiny_adapter(d / n, base, seed=s)) for n, s in (("w1", 1), ("w2", 2), ("w3", 3))}
    adapters["too-big"] = str(make_tiny_adapter(d / "too-big", base, rank=16))  # above max_lora_rank 8
    return base, adapters


def greedy(engine: LLMEngine, adapter: str | None, max_tokens: int = 8, rid: str = "r") -> list[int]:
    engine.add_request(rid, PROMPT_IDS, SamplingParams(max_tokens=max_tokens, temperature=0, adapter=adapter))
    tokens: list[int] = []
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
    return tokens


@pytest.fixture(scope="module")
def reference(tiny: tuple[Path, dict[str, str]]) -> dict[str, list[int]]:
    """Each adapter's greedy tokens (and the base model's), from an engine that never changed."""
    base, paths = tiny
    modules = [(n, paths[n]) for n in ("w1", "w2", "w3")]
    engine = LLMEngine(base, EngineConfig(device="cpu", max_loras=3, max_lora_rank=8, lora_modules=modules))
    return {name: greedy(engine, None if name == "base" else name, 24) for name in ("base", "w1", "w2", "w3")}


def test_a_request_in_flight_keeps_its_version_and_new_ones_get_the_new_set(
    tiny: tuple[Path, dict[str, str]], reference: dict[str, list[int]]
) -> None:
    base, paths = tiny
    assert len({tuple(t) for t in reference.values()}) == 4  # the adapters change the output
    engine = LLMEngine(
        base, EngineConfig(device="cpu", max_loras=2, max_lora_rank=8, lora_modules=[("a", paths["w1"])])
    )
    engine.add_request("old", PROMPT_IDS, SamplingParams(max_tokens=24, temperature=0, adapter="a"))
    old: list[int] = []
    for out in engine.step() + engine.step():
        old += out.new_token_ids
    # "a" now points at other weights, and "b" is new: the request in flight finishes on the old "a".
    failed = engine.set_adapters([("a", paths["w2"]), ("b", paths["w3"])])
    assert failed == {}
    assert sorted(engine.adapters) == ["a", "b"]
    engine.add_request("new", PROMPT_IDS, SamplingParams(max_tokens=24, temperature=0, adapter="a"))
    new: list[int] = []
    while engine.has_unfinished():
        for out in engine.step():
            (old if out.request_id == "old" else new).extend(out.new_token_ids)
    assert old == reference["w1"]
    assert new == reference["w2"]
    lora = engine.runner.lora
    assert lora is not None
    loads = lora.loads_total
    assert greedy(engine, "b", 24) == reference["w3"]
    assert lora.loads_total == loads + 1  # copied into its slot once, not once per step
    # Removed: refused by name; the base model and the rest serve on, old versions are let go.
    engine.set_adapters([("b", paths["w3"])])
    with pytest.raises(ValueError, match="unknown LoRA adapter 'a'"):
        engine.add_request("gone", PROMPT_IDS, SamplingParams(max_tokens=2, adapter="a"))
    assert greedy(engine, None, 24) == reference["base"]
    assert set(lora.versions) == {lora.key_of["b"]}


def test_a_bad_adapter_is_reported_and_the_others_are_served(tiny: tuple[Path, dict[str, str]]) -> None:
    base, paths = tiny
    engine = LLMEngine(base, EngineConfig(device="cpu", max_loras=2, max_lora_rank=8))
    failed = engine.set_adapters([("big", paths["too-big"]), ("ok", paths["w1"])])
    assert set(failed) == {"big"} and "max LoRA rank 8" in failed["big"]
    assert engine.adapters == ["ok"]
    with pytest.raises(ValueError, match="'big' failed to load"):
        engine.add_request("x", PROMPT_IDS, SamplingParams(max_tokens=2, adapter="big"))


def test_an_engine_without_slots_refuses_adapters(tiny: tuple[Path, dict[str, str]]) -> None:
    engine = LLMEngine(tiny[0], EngineConfig(device="cpu"))
    with pytest.raises(ValueError, match="without LoRA adapter slots"):
        engine.set_adapters([("a", tiny[1]["w1"])])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "adapter file"),
        ('{"adapters": {"a": "/x"}}', "expected"),
        ('{"adapters": [{"name": "a"}]}', "needs a name and a source"),
        ('{"adapters": [{"name": "base", "source": "/x"}]}', "names the base model"),
        ('{"adapters": [{"name": "a", "source": "/x"}, {"name": "a", "source": "/y"}]}', "must be unique"),
    ],
)
def test_bad_adapter_files_are_refused_naming_the_problem(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "adapters.json").write_text(content)
    with pytest.raises(AdapterError, match=message):
        read_adapter_file(tmp_path / "adapters.json")


def test_lora_and_lora_file_together_are_refused(tmp_path: Path) -> None:
    args = ["serve", "--model", str(tmp_path), "--lora", "a=/x", "--lora-file", str(tmp_path / "f.json")]
    result = CliRunner().invoke(cli_main, args)
    assert result.exit_code == 2 and "not both" in result.output


def write_adapters(path: Path, adapters: dict[str, str]) -> None:
    entries = [{"name": name, "source": source} for name, source in adapters.items()]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"adapters": entries}))
    tmp.replace(path)  # as the kubelet swaps a ConfigMap volume's files: whole, never half-written


@pytest.fixture
def server(tiny: tuple[Path, dict[str, str]], tmp_path: Path) -> Iterator[tuple[str, Path]]:
    base, paths = tiny
    adapter_file = tmp_path / "adapters.json"
    write_adapters(adapter_file, {"a": paths["w1"]})
    config = EngineConfig(device="cpu", max_model_len=128, max_loras=2, max_lora_rank=8, lora_modules=[])
    model = served_model(base, MODEL, config)
    model.adapter_file, model.adapter_file_text, model.adapter_poll_s = adapter_file, None, 0.1
    with AppServer(create_app(model, ServerSettings())) as served:
        yield served.url, adapter_file


def models_become(client: openai.OpenAI, wanted: set[str], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while (served := {m.id for m in client.models.list().data}) != wanted:
        assert time.monotonic() < deadline, f"/v1/models lists {sorted(served)}, not {sorted(wanted)}"
        time.sleep(0.1)


def test_the_served_adapters_follow_the_file_without_dropping_a_stream(
    tiny: tuple[Path, dict[str, str]], server: tuple[str, Path]
) -> None:
    paths = tiny[1]
    url, adapter_file = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    models_become(client, {MODEL, "a"})  # read at the first look (no content was served before)

    first = client.completions.create(model="a", prompt=PROMPT_IDS, max_tokens=24, temperature=0)
    stream = client.completions.create(
        model="a", prompt=PROMPT_IDS, max_tokens=100, temperature=0, stream=True
    )
    chunks = iter(stream)
    streamed = next(chunks).choices[0].text
    write_adapters(adapter_file, {"b": paths["w2"]})  # "a" removed while its stream runs
    models_become(client, {MODEL, "b"})
    for chunk in chunks:
        streamed += chunk.choices[0].text
    assert streamed.startswith(first.choices[0].text)  # finished on the version it started with
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="a", prompt=PROMPT_IDS, max_tokens=2)
    assert isinstance(err.value.body, dict) and err.value.body["param"] == "model"
    b = client.completions.create(model="b", prompt=PROMPT_IDS, max_tokens=24, temperature=0)
    assert b.choices[0].text != first.choices[0].text and b.model == "b"

    # A file that is not valid changes nothing; a bad adapter is refused with its reason.
    adapter_file.write_text("{ not json")
    time.sleep(0.5)
    models_become(client, {MODEL, "b"}, timeout=1.0)
    write_adapters(adapter_file, {"b": paths["w2"], "big": paths["too-big"]})
    deadline = time.monotonic() + 20
    while True:
        try:
            client.completions.create(model="big", prompt=PROMPT_IDS, max_tokens=2)
        except openai.BadRequestError as exc:
            if "failed to load" in str(exc.body):
                assert "max LoRA rank 8" in str(exc.body)
                break
        assert time.monotonic() < deadline, "the bad adapter was never reported"
        time.sleep(0.1)
    again = client.completions.create(model="b", prompt=PROMPT_IDS, max_tokens=24, temperature=0)
    assert again.choices[0].text == b.choices[0].text


def test_a_changed_file_fetches_only_the_adapters_it_adds_or_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each look at a changed file downloads the new sources only; adapters it still lists keep the
    directories they were fetched to (a remote source is never asked again)."""
    asked: list[str] = []

    def fetch(name: str, source: str) -> Path:
        asked.append(source)
        return tmp_path / source.rsplit("/", 1)[-1]

    monkeypatch.setattr(lora_watch, "fetch_adapter", fetch)
    applied: list[list[tuple[str, str]]] = []

    async def apply(fetched: list[tuple[str, str]], failed: dict[str, str]) -> dict[str, str]:
        applied.append(fetched)
        return {}

    adapter_file = tmp_path / "adapters.json"
    watch = AdapterFileWatch(adapter_file, apply, None, 1.0)
    for adapters in (
        {"a": "s3://bucket/a1"},
        {"a": "s3://bucket/a1", "b": "s3://bucket/b1"},  # b added
        {"a": "s3://bucket/a2", "b": "s3://bucket/b1"},  # a replaced
        {"b": "s3://bucket/b1", "a": "s3://bucket/a1"},  # a back to its first source: fetched again
    ):
        write_adapters(adapter_file, adapters)
        assert asyncio.run(watch.check())
    assert asked == ["s3://bucket/a1", "s3://bucket/b1", "s3://bucket/a2", "s3://bucket/a1"]
    assert applied[-1] == [("b", str(tmp_path / "b1")), ("a", str(tmp_path / "a1"))]
