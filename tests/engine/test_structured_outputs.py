"""Structured outputs (`response_format` json_schema / json_object, and the regex / grammar extension,
through xgrammar token masks), with the official `openai` client over real HTTP on a tiny random
model: whatever the model would say, every constrained output parses and validates against its
(hypothesis-generated) schema, and matches its regex or grammar.
"""

from __future__ import annotations

import collections
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.engine

pytest.importorskip("torch")
pytest.importorskip("xgrammar")
openai = pytest.importorskip("openai")
jsonschema_rs = pytest.importorskip("jsonschema_rs")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kiln_engine import grammar  # noqa: E402
from kiln_engine.config import EngineConfig  # noqa: E402
from kiln_engine.engine import LLMEngine  # noqa: E402
from kiln_engine.interface import SamplingParams  # noqa: E402
from kiln_engine.server.app import ServerSettings  # noqa: E402
from kiln_engine.testing.tiny import make_tiny_checkpoint  # noqa: E402
from tests.engine.test_server import MODEL, ThreadServer  # noqa: E402

MESSAGES = [{"role": "user", "content": "Give me JSON"}]
MAX_TOKENS = 320


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "llama", seed=3)


@pytest.fixture(scope="module")
def server(checkpoint: Path) -> Iterator[ThreadServer]:
    with ThreadServer(checkpoint, ServerSettings(), max_model_len=512) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: ThreadServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


# Schemas whose every valid instance is short, so a random model's output always completes.
names = st.text(alphabet="abcdefghij_", min_size=1, max_size=6)
leaves = st.one_of(
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.integers(-50, 50).flatmap(lambda lo: st.integers(lo, lo + 100).map(
        lambda hi: {"type": "integer", "minimum": lo, "maximum": hi})),
    st.integers(0, 5).map(lambda n: {"type": "string", "maxLength": n}),
    st.lists(st.one_of(names, st.integers(-9, 99)), min_size=1, max_size=3, unique=True).map(
        lambda values: {"enum": values}),
)  # fmt: skip


def containers(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    objects = st.dictionaries(names, children, min_size=1, max_size=3).map(
        lambda props: {
            "type": "object",
            "properties": props,
            "required": sorted(props),
            "additionalProperties": False,
        }
    )
    arrays = st.tuples(children, st.integers(0, 2)).map(
        lambda t: {"type": "array", "items": t[0], "maxItems": t[1]}
    )
    return st.one_of(objects, arrays)


schemas = st.recursive(leaves, containers, max_leaves=6).filter(lambda s: "properties" in s or "items" in s)


def json_schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(schema=schemas, seed=st.integers(0, 2**32))
def test_every_constrained_output_validates_against_its_schema(
    client: openai.OpenAI, schema: dict[str, Any], seed: int
) -> None:
    out = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=1.0, seed=seed,
        response_format=json_schema_format(schema),  # type: ignore[arg-type]
    )  # fmt: skip
    choice = out.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema_rs.validate(schema, json.loads(choice.message.content or ""))


def test_streamed_constrained_output_validates(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"type": "integer", "minimum": 1,
                                                                            "maximum": 7}},
        "required": ["city", "days"],
        "additionalProperties": False,
    }  # fmt: skip
    kwargs: dict[str, Any] = {
        "model": MODEL, "messages": MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 1.0, "seed": 4,
        "response_format": json_schema_format(schema), "n": 2,
    }  # fmt: skip
    whole = client.chat.completions.create(**kwargs)
    texts = ["", ""]
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == [c.message.content for c in sorted(whole.choices, key=lambda c: c.index)]
    for text in texts:
        jsonschema_rs.validate(schema, json.loads(text))


def test_json_object_outputs_are_objects(client: openai.OpenAI) -> None:
    stopped = 0
    for seed in range(6):
        out = client.completions.create(
            model=MODEL, prompt="JSON:", max_tokens=MAX_TOKENS, temperature=1.0, seed=seed,
            extra_body={"response_format": {"type": "json_object"}},
        )  # fmt: skip
        choice = out.choices[0]
        if choice.finish_reason == "stop":
            stopped += 1
            assert isinstance(json.loads(choice.text), dict), choice.text
        else:  # a random model may write one long string: cut by max_tokens, still a JSON object's start
            assert choice.finish_reason == "length" and choice.text.startswith("{")
    assert stopped >= 1


BAD_FORMATS: list[tuple[dict[str, Any], dict[str, Any], str]] = [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}, {},
     "response_format.json_schema.schema"),
    ({"type": "json_schema"}, {}, "response_format"),
    ({"type": "json_object", "json_schema": {"name": "x", "schema": {}}}, {}, "response_format"),
    ({"type": "xml"}, {}, "response_format.type"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, {}, "response_format.json_schema.name"),
    ({"type": "json_object"}, {"ignore_eos": True}, "response_format"),
    ({"type": "json_object"}, {"min_tokens": 2}, "response_format"),
    ({"type": "regex", "regex": "a(b"}, {}, "response_format.regex"),
    ({"type": "regex"}, {}, "response_format"),
    ({"type": "text", "regex": "a"}, {}, "response_format"),
    ({"type": "grammar", "grammar": 'root ::= "a" undefined'}, {}, "response_format.grammar"),
    ({"type": "grammar", "grammar": "root ::= "}, {}, "response_format.grammar"),
]  # fmt: skip


@pytest.mark.parametrize(("response_format", "extra", "param"), BAD_FORMATS, ids=[p for *_, p in BAD_FORMATS])
def test_bad_response_formats_are_a_400_naming_them(
    client: openai.OpenAI, response_format: dict[str, Any], extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=8,
            extra_body={"response_format": response_format, **extra},
        )  # fmt: skip
    body = info.value.body
    assert isinstance(body, dict) and body["param"] == param, body


# Extension: regexes and EBNF grammars, each with a Python regex of the same language.
PATTERNS = [
    r"\d{3}-\d{4}",
    r"(yes|no|maybe)",
    r"[A-Z][a-z]{1,5}( [A-Z][a-z]{1,5}){0,2}\.",
    r"first line\n\tsecond line",  # control characters, which JSON grammars mask, are the regex's call
]
GRAMMAR = '''root ::= "(" num ("," num)? ("," num)? ")"
num ::= "-"? [1-9] [0-9]? | "0"'''
GRAMMAR_LANGUAGE = r"\((-?[1-9][0-9]?|0)(,(-?[1-9][0-9]?|0)){0,2}\)"


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("stream", [False, True])
def test_regex_outputs_match_whole(client: openai.OpenAI, pattern: str, stream: bool) -> None:
    for seed in range(3):
        response_format = {"type": "regex", "regex": pattern}
        kwargs: dict[str, Any] = {"model": MODEL, "max_tokens": 64, "temperature": 1.0, "seed": seed,
                                  "extra_body": {"response_format": response_format}}  # fmt: skip
        if stream:  # the completions endpoint takes response_format too (an extension)
            chunks = list(client.completions.create(prompt="Answer:", stream=True, **kwargs))
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            out = client.chat.completions.create(messages=MESSAGES, **kwargs)
            text, reason = out.choices[0].message.content or "", out.choices[0].finish_reason
        assert reason == "stop" and re.fullmatch(pattern, text), (pattern, text)


def test_grammar_outputs_are_in_its_language(client: openai.OpenAI) -> None:
    for seed in range(4):
        out = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=64, temperature=1.0, seed=seed,
            extra_body={"response_format": {"type": "grammar", "grammar": GRAMMAR}},
        )  # fmt: skip
        text = out.choices[0].message.content or ""
        assert out.choices[0].finish_reason == "stop" and re.fullmatch(GRAMMAR_LANGUAGE, text), text


def test_text_format_is_free_text(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    plain = client.chat.completions.create(**kwargs).choices[0].message.content
    text = client.chat.completions.create(response_format={"type": "text"}, **kwargs)
    assert text.choices[0].message.content == plain


def test_constrained_and_free_rows_of_a_batch_do_not_affect_each_other(checkpoint: Path) -> None:
    engine = LLMEngine(checkpoint, EngineConfig(num_kv_blocks=256, block_size=4, max_model_len=512))
    assert engine.tokenizer is not None
    prompt = engine.tokenizer.encode("Hello")
    schema = json.dumps(
        {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3}
    )
    cases = [
        SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=3, structured=("json_schema", schema)),
        SamplingParams(max_tokens=24, temperature=1.0, seed=8, presence_penalty=1.0),
        SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, structured=("json_object", "")),
    ]
    alone = [engine.generate([prompt], params)[0] for params in cases]
    together = engine.generate([prompt] * len(cases), cases)
    assert together == alone
    assert engine.tokenizer is not None
    values = json.loads(engine.tokenizer.decode(together[1]))
    assert isinstance(values, list) and all(0 <= v <= 9 for v in values)


def test_json_strings_get_no_control_characters_and_no_invalid_utf8(checkpoint: Path) -> None:
    """xgrammar's bounded JSON strings admit raw control bytes, which JSON forbids, and UTF-8-encoded
    surrogates, which are not UTF-8: both stay masked."""
    import xgrammar
    from transformers import PreTrainedTokenizerFast

    from kiln_engine.grammar import Grammars, allocate_bitmask
    from kiln_engine.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(checkpoint)
    vocab = tok.vocab_size
    state = Grammars(tok.tk, vocab, [1]).state(
        ("json_schema", json.dumps({"type": "string", "maxLength": 8}))
    )
    bitmask = allocate_bitmask(1, vocab)
    state.fill_mask(tok.encode('"', add_special_tokens=False), 0, bitmask, 0)  # inside the string now
    words = bitmask[0].tolist()
    allowed = {t for t in range(vocab) if (words[t // 32] >> (t % 32)) & 1}
    control = {t for t in range(vocab) if any(ord(c) < 0x20 for c in tok.decode([t]))}
    assert control, "precondition: the vocabulary has tokens for control bytes"
    assert allowed and not allowed & control
    # 0xED 0xA0..0xBF would encode a surrogate (not UTF-8, decoded as U+FFFD): after a token that
    # ends in the lead byte 0xED, only continuation bytes 0x80..0x9F may come
    info = xgrammar.TokenizerInfo.from_huggingface(
        PreTrainedTokenizerFast(tokenizer_object=tok.tk), vocab_size=vocab, stop_token_ids=[1]
    )
    by_bytes = {text: t for t, text in enumerate(info.decoded_vocab)}
    lead, fine, surrogate = by_bytes[b"\xed"], by_bytes[b"\x80"], by_bytes[b"\xa0"]
    state.fill_mask([*tok.encode('"', add_special_tokens=False), lead], 0, bitmask, 0)
    words = bitmask[0].tolist()
    assert (words[fine // 32] >> (fine % 32)) & 1 and not (words[surrogate // 32] >> (surrogate % 32)) & 1


def test_constrained_requests_decode_with_lookahead_steps_as_with_plain_ones(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Grammar masks are filled when sampling, after the forward pass is enqueued; under lookahead
    decoding (eager on CPU) they read the token of the step before once it is sampled, on the
    sampler's fill thread while the engine's thread does that step's bookkeeping, so constrained
    requests keep lookahead on and get the tokens of plain steps."""
    fill_threads: list[str] = []
    fill_masks = grammar.fill_masks

    def recording_fill(*args: Any) -> None:
        fill_threads.append(threading.current_thread().name)
        fill_masks(*args)

    monkeypatch.setattr(grammar, "fill_masks", recording_fill)
    schema = json.dumps({"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}})
    cases = [
        SamplingParams(max_tokens=60, temperature=1.0, seed=3, structured=("json_schema", schema)),
        SamplingParams(max_tokens=60, temperature=0.0, structured=("regex", r"[a-z]{3,9}( [a-z]{3,9}){5}")),
        SamplingParams(max_tokens=60, temperature=1.0, seed=8, structured=("json_object", "")),
        SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True),  # a free row in the batch
    ]
    results = {}
    threads = {}
    for mode, cfg in {"plain": {}, "lookahead": {"cuda_graphs": True, "lookahead_decode": True}}.items():
        fill_threads.clear()
        engine = LLMEngine(
            checkpoint, EngineConfig(num_kv_blocks=256, block_size=4, max_model_len=512, **cfg)
        )
        assert engine.tokenizer is not None
        for i, params in enumerate(cases):
            engine.add_request(f"r{i}", engine.tokenizer.encode(f"Hello {i}"), params)
        tokens: dict[str, list[int]] = {}
        looked_ahead = 0
        while engine.has_unfinished():
            for out in engine.step():
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            looked_ahead += engine.in_flight is not None
        results[mode] = tokens
        threads[mode] = collections.Counter(name.split("_")[0] for name in fill_threads)
        assert (looked_ahead > 10) == (mode == "lookahead"), (mode, looked_ahead)
    assert results["lookahead"] == results["plain"]
    assert set(threads["plain"]) == {"MainThread"}, threads
    assert threads["lookahead"]["kiln-grammar-fill"] > 10, threads
    assert engine.tokenizer is not None
    assert re.fullmatch(r"[a-z]{3,9}( [a-z]{3,9}){5}", engine.tokenizer.decode(results["plain"]["r1"]))


def test_a_threaded_mask_fill_gives_the_tokens_a_serial_one_does(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine spreads costly fills over threads (grammar.FillThreads): the masks, and so the
    sampled tokens, must not depend on how many threads filled them."""
    from kiln_engine import grammar

    engine = LLMEngine(checkpoint, EngineConfig(num_kv_blocks=512, block_size=4, max_model_len=512))
    assert engine.tokenizer is not None
    prompts = [engine.tokenizer.encode(f"Request {i}") for i in range(8)]
    schema = json.dumps({"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]})
    params = [
        SamplingParams(max_tokens=96, temperature=1.0, seed=i, structured=("json_schema", schema))
        for i in range(8)
    ]
    outputs = {}
    for threads in (1, 2):
        monkeypatch.setattr(grammar, "FILL_THREADS", threads)
        outputs[threads] = engine.generate(prompts, params)
    assert outputs[1] == outputs[2]
    assert len({tuple(o) for o in outputs[1]}) > 1  # seeded rows differ, so the masks were exercised
