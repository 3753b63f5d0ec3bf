"""Tokenizer: encode/decode and chat templates agree with transformers; incremental detokenization."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln_engine.testing import make_tiny_checkpoint
from kiln_engine.tokenizer import IncrementalDetokenizer, Tokenizer

pytestmark = pytest.mark.engine
transformers = pytest.importorskip("transformers")

TEXTS = ["Hello, world!", "Café, naïve, über, 東京, 😀 — unicode", "  leading spaces\nand lines\n", "A"]
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan? 東京?"},
]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def ckpt(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param)


def test_encode_decode_match_transformers(ckpt: Path) -> None:
    ours = Tokenizer.from_dir(ckpt)
    hf = transformers.AutoTokenizer.from_pretrained(ckpt)
    for text in TEXTS:
        assert ours.encode(text) == hf(text)["input_ids"]
        assert ours.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False)["input_ids"]
        ids = ours.encode(text)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True) == text


def test_chat_template_matches_transformers(ckpt: Path) -> None:
    ours = Tokenizer.from_dir(ckpt)
    hf = transformers.AutoTokenizer.from_pretrained(ckpt)
    for gen in (True, False):
        want = hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=gen)
        assert ours.apply_chat_template(CHAT, add_generation_prompt=gen) == want
        want_ids = hf.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=gen, return_dict=True)
        assert ours.encode_chat(CHAT, add_generation_prompt=gen) == want_ids["input_ids"]


def test_special_tokens_and_eos_ids(ckpt: Path) -> None:
    ours = Tokenizer.from_dir(ckpt)
    hf = transformers.AutoTokenizer.from_pretrained(ckpt)
    assert ours.bos_token == hf.bos_token and ours.eos_token == hf.eos_token
    # generation_config.json lists <|end_of_text|> and <|im_end|>; the tokenizer's eos is one of them.
    assert {hf.convert_tokens_to_ids("<|end_of_text|>"), hf.convert_tokens_to_ids("<|im_end|>")} == set(
        ours.eos_token_ids
    )


def test_template_errors_surface(tmp_path: Path, ckpt: Path) -> None:
    ours = Tokenizer.from_dir(ckpt)
    ours.templates = {"default": "{{ raise_exception('no system role') }}"}
    ours._compiled.clear()
    with pytest.raises(Exception, match="no system role"):
        ours.apply_chat_template(CHAT)
    ours.templates = {}
    with pytest.raises(ValueError, match="no chat template"):
        ours.apply_chat_template(CHAT)


def test_incremental_detokenization_reassembles_text(ckpt: Path) -> None:
    tok = Tokenizer.from_dir(ckpt)
    for text in TEXTS:
        prompt = tok.encode("Once upon a time")
        ids = tok.encode(text, add_special_tokens=False)
        detok = IncrementalDetokenizer(tok, prompt)
        deltas = [detok.add(i) for i in ids]
        assert "".join(deltas) == text
        assert not any("\ufffd" in d for d in deltas)  # multi-byte characters are never split
