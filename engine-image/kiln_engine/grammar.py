"""Structured outputs: compiles a request's `structured` spec (a JSON schema, or any JSON object) into
an xgrammar grammar for the model's tokenizer, and keeps each constrained request's grammar state,
which yields the bitmask of tokens allowed next.

xgrammar is optional (the `engine` extra installs it); without it an engine serves no constrained
requests and says so. xgrammar's JSON strings admit raw control characters, which JSON forbids
(and parsers reject), so tokens holding a byte below 0x20 are masked out of every JSON grammar.
Compiling is cached by the spec, so the server compiles (and so validates) a request's spec in its
thread pool and the engine thread only finds it in the cache.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is not needed to name kinds or to validate a spec's shape
    import torch
    from tokenizers import Tokenizer as HFTokenizer

JSON_OBJECT = "json_object"  # any JSON object
JSON_SCHEMA = "json_schema"  # JSON that validates against the given schema (strictly: no extra keys)
KINDS = (JSON_OBJECT, JSON_SCHEMA)


def available() -> bool:
    try:
        import xgrammar  # noqa: F401
    except ImportError:
        return False
    return True


class Grammars:
    """The grammar compiler of one tokenizer and vocabulary (a model's logits may be wider)."""

    def __init__(self, tokenizer: HFTokenizer, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._stop_token_ids = sorted(stop_token_ids)
        self._compiler: Any = None
        self._json_safe: torch.Tensor | None = None  # bitmask row: every token without control bytes
        self._lock = threading.Lock()  # the server's threads and the engine thread compile

    def _get_compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr
                from transformers import PreTrainedTokenizerFast

                hf = PreTrainedTokenizerFast(tokenizer_object=self._tokenizer)
                info = xgr.TokenizerInfo.from_huggingface(
                    hf, vocab_size=self.vocab_size, stop_token_ids=self._stop_token_ids
                )
                self._json_safe = _without_control_bytes(info.decoded_vocab, self.vocab_size)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1)
            return self._compiler

    def compile(self, spec: tuple[str, str]) -> Any:
        """The compiled grammar of `(kind, schema JSON)`; ValueError saying why when it cannot be."""
        kind, source = spec
        if kind not in KINDS:
            raise ValueError(f"unknown structured output kind {kind!r}")
        compiler = self._get_compiler()
        try:
            if kind == JSON_OBJECT:
                return compiler.compile_json_schema(
                    '{"type": "object"}', any_whitespace=False, strict_mode=False
                )
            schema = json.loads(source)
            return compiler.compile_json_schema(schema, any_whitespace=False, strict_mode=True)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ValueError(f"the JSON schema cannot be used: {_first_line(exc)}") from exc

    def state(self, spec: tuple[str, str]) -> GrammarState:
        import xgrammar as xgr

        compiled = self.compile(spec)
        assert self._json_safe is not None  # computed with the compiler
        return GrammarState(xgr.GrammarMatcher(compiled), self._json_safe)


class GrammarState:
    """One constrained request's position in its grammar, as far as its tokens have been seen."""

    def __init__(self, matcher: Any, allowed: torch.Tensor) -> None:
        self._matcher = matcher
        self._allowed = allowed  # tokens the grammar may ever allow (a bitmask row)
        self._accepted = 0  # generated tokens fed to the matcher so far

    def fill_mask(
        self, token_ids: Sequence[int], num_prompt_tokens: int, bitmask: torch.Tensor, row: int
    ) -> None:
        """Feed the tokens generated since the last call, then write the allowed next tokens
        (one bit each, xgrammar's layout) into `bitmask[row]`."""
        for token in token_ids[num_prompt_tokens + self._accepted :]:
            if not self._matcher.accept_token(token):
                raise RuntimeError(f"token {token} breaks the grammar it was sampled under")
            self._accepted += 1
        self._matcher.fill_next_token_bitmask(bitmask, row)
        bitmask[row] &= self._allowed


def _without_control_bytes(decoded_vocab: Sequence[bytes], vocab_size: int) -> torch.Tensor:
    """A bitmask row (xgrammar's layout: bit t % 32 of int32 word t // 32) of the tokens whose bytes
    are all >= 0x20; special tokens such as EOS decode to their text and stay allowed."""
    import torch

    words = [0xFFFFFFFF] * ((vocab_size + 31) // 32)
    for token, text in enumerate(decoded_vocab[:vocab_size]):
        if any(byte < 0x20 for byte in text):
            words[token // 32] &= ~(1 << (token % 32)) & 0xFFFFFFFF
    return torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """A host bitmask for `rows` rows that allows every token."""
    import xgrammar as xgr

    return xgr.allocate_token_bitmask(rows, vocab_size)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set the logits of disallowed tokens to -inf, in place ([R, V] and [R, ceil(V/32)])."""
    import xgrammar as xgr

    xgr.apply_token_bitmask_inplace(logits, bitmask)


def _first_line(exc: BaseException) -> str:
    """xgrammar's message without its timestamp and source location."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", lines[-1]).removeprefix("Check failed: ")
