"""Structured outputs: compiles a request's `structured` spec (a JSON schema, any JSON object, a regex,
an EBNF grammar, or an xgrammar structural tag such as a tool-call format) into an xgrammar grammar for
the model's tokenizer, and keeps each constrained request's grammar state, which yields the bitmask
of tokens allowed next.

xgrammar is optional (the `engine` extra installs it); without it an engine serves no constrained
requests and says so. xgrammar's bounded JSON strings admit raw control characters, which JSON
forbids, and byte sequences that are not UTF-8 (surrogates, overlong forms), which decode to U+FFFD:
`VocabMasks` masks those tokens out of every grammar, by their bytes and by the byte before them
(control bytes only out of JSON; structural tags keep tab and newlines, which tool-call formats use;
a regex or EBNF grammar decides about control characters itself).
Compiling is cached by the spec, so the server compiles (and so validates) a request's spec in its
thread pool and the engine thread only finds it in the cache.
"""

from __future__ import annotations

import functools
import json
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is not needed to name kinds or to validate a spec's shape
    import torch
    from tokenizers import Tokenizer as HFTokenizer

JSON_OBJECT = "json_object"  # any JSON object
JSON_SCHEMA = "json_schema"  # JSON that validates against the given schema (strictly: no extra keys)
REGEX = "regex"  # text that matches the regular expression, whole
EBNF = "grammar"  # text in the language of an EBNF grammar (xgrammar's / GBNF dialect, rule `root`)
STRUCTURAL_TAG = "structural_tag"  # an xgrammar structural tag (JSON), e.g. a model's tool-call format
KINDS = (JSON_OBJECT, JSON_SCHEMA, REGEX, EBNF, STRUCTURAL_TAG)

# Control bytes a kind's outputs may hold (all others are masked): none in JSON, the whitespace of
# tool-call formats in structural tags, any in a regex or grammar (the grammar itself decides).
_WHITESPACE_CONTROLS = frozenset(b"\t\n\r")
_ALLOWED_CONTROLS: dict[str, frozenset[int]] = {
    JSON_OBJECT: frozenset(),
    JSON_SCHEMA: frozenset(),
    STRUCTURAL_TAG: _WHITESPACE_CONTROLS,
    REGEX: frozenset(range(0x20)),
    EBNF: frozenset(range(0x20)),
}
_WHAT = {
    JSON_OBJECT: "the JSON schema",
    JSON_SCHEMA: "the JSON schema",
    REGEX: "the regex",
    EBNF: "the grammar",
    STRUCTURAL_TAG: "the structural tag",
}


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
        self._decoded_vocab: list[bytes] = []
        self._masks: dict[frozenset[int], VocabMasks] = {}  # by the control bytes they allow
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
                self._decoded_vocab = list(info.decoded_vocab)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1)
            return self._compiler

    def compile(self, spec: tuple[str, str]) -> Any:
        """The compiled grammar of `(kind, source)` (a schema, regex, EBNF or structural tag as text);
        ValueError saying why when it cannot be. xgrammar caches compiled grammars by their source."""
        kind, source = spec
        if kind not in KINDS:
            raise ValueError(f"unknown structured output kind {kind!r}")
        compiler = self._get_compiler()
        try:
            if kind == JSON_OBJECT:
                return compiler.compile_json_schema(
                    '{"type": "object"}', any_whitespace=False, strict_mode=False
                )
            if kind == REGEX:
                return compiler.compile_regex(source)
            if kind == EBNF:
                return compiler.compile_grammar(source)
            if kind == STRUCTURAL_TAG:
                return compiler.compile_structural_tag(source)
            schema = json.loads(source)
            return compiler.compile_json_schema(schema, any_whitespace=False, strict_mode=True)
        except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar's errors derive from these
            raise ValueError(f"{_WHAT[kind]} cannot be used: {_first_line(exc)}") from exc

    def state(self, spec: tuple[str, str]) -> GrammarState:
        import xgrammar as xgr

        compiled = self.compile(spec)
        masks = self._masks_for(_ALLOWED_CONTROLS[spec[0]])
        return GrammarState(xgr.GrammarMatcher(compiled), masks, frozenset(self._stop_token_ids))

    def _masks_for(self, controls: frozenset[int]) -> VocabMasks:
        with self._lock:
            if controls not in self._masks:
                self._masks[controls] = VocabMasks.of(self._decoded_vocab, self.vocab_size, controls)
            return self._masks[controls]


class GrammarState:
    """One constrained request's position in its grammar, as far as its tokens have been seen."""

    def __init__(self, matcher: Any, masks: VocabMasks, stop_token_ids: frozenset[int]) -> None:
        self.matcher = matcher
        self.masks = masks
        self._stop_token_ids = stop_token_ids
        self._accepted = 0  # generated tokens fed to the matcher so far
        self.last = -1  # the last generated token
        self.ended = False  # the grammar's stop token accepted: the row's mask stays all ones

    def new_tokens(self, token_ids: Sequence[int], num_prompt_tokens: int, pending: int | None) -> list[int]:
        """The tokens generated since the last call. `pending`: the value of the last token when
        `token_ids` ends in a placeholder for it (a lookahead step is enqueued before the host reads
        the token of the step it follows)."""
        new = list(token_ids[num_prompt_tokens + self._accepted :])
        if pending is not None and new and new[-1] < 0:
            new[-1] = pending
        return new

    def took(self, token: int, accepted: bool) -> None:
        """Record that the matcher was given `token` (and whether it accepted it)."""
        if not accepted:
            raise RuntimeError(f"token {token} breaks the grammar it was sampled under")
        self._accepted += 1
        self.last = token
        # A matcher ends only by accepting a stop token: the cheaper test first.
        self.ended = token in self._stop_token_ids and self.matcher.is_terminated()

    def advance(self, tokens: Sequence[int]) -> bool:
        """Feed `tokens` to the matcher, up to the grammar's end; False once it has ended."""
        for token in tokens:
            if self.ended:
                break
            self.took(token, self.matcher.accept_token(token))
        return not self.ended

    def fill_draft_masks(
        self,
        token_ids: Sequence[int],
        num_prompt_tokens: int,
        drafts: Sequence[int],
        bitmask: torch.Tensor,
        first_row: int,
    ) -> None:
        """For a verify step (speculative decoding): row `first_row + j` of `bitmask` gets the tokens
        allowed after the real tokens (`token_ids` less the trailing `drafts`) and the first j drafts.
        The drafts are fed to the matcher and rolled back, so it stays at the real tokens. Rows past
        a draft the grammar refuses, or past its end, keep every token: greedy acceptance stops
        before them, since the refused draft is not allowed in the row before it."""
        real = token_ids[: len(token_ids) - len(drafts)]
        if not self.advance(self.new_tokens(real, num_prompt_tokens, None)):
            return
        fed, last = 0, self.last
        for j in range(len(drafts) + 1):
            self.matcher.fill_next_token_bitmask(bitmask, first_row + j)
            bitmask[first_row + j] &= self.masks.table[self.masks.choice(last)]
            if j == len(drafts) or not self.matcher.accept_token(drafts[j]):
                break
            fed, last = fed + 1, drafts[j]
            if self.matcher.is_terminated():
                break
        if fed:
            self.matcher.rollback(fed)

    def fill_mask(
        self,
        token_ids: Sequence[int],
        num_prompt_tokens: int,
        bitmask: torch.Tensor,
        row: int,
        pending: int | None = None,
    ) -> None:
        """Feed the new tokens, then write the allowed next tokens (one bit each, xgrammar's layout)
        into `bitmask[row]`. One row at a time: a step's rows go through `fill_masks` together."""
        fill_masks([(row, self)], bitmask, [(token_ids, num_prompt_tokens, pending)])


@functools.cache
def _batch_matcher(threads: int) -> Any:
    """xgrammar's batch matcher with `threads` threads (1: on the calling thread)."""
    import xgrammar as xgr

    return xgr.BatchGrammarMatcher(max_threads=threads)


FILL_THREADS: int | None = None  # None: FillThreads decides per fill (bench --fill-threads fixes it)
MULTI_THREAD_ABOVE_S = 2e-3  # a serial fill slower than this is spread over threads
PROBE_EVERY = 64  # fills: while threaded, every 64th fill runs serially to measure the serial cost
MAX_FILL_THREADS = 8


def threads_for_fill(serial_s: float, cpus: int) -> int:
    """Threads for a batch fill whose serial cost was `serial_s`. xgrammar's pool costs 0.3-2 ms a
    call, more than a cheap fill (a small JSON object at 128 rows: 68 us with 1 thread, 336 us with
    2; bench/results-committed/structured_outputs-h100-run2-profile.txt), but a free-text state at a
    128,000-token vocabulary costs about 200 us a row, 27.6 ms at 128 rows, and threads divide that
    (14.6 ms with 2 threads on 2 cores; bench/results-committed/grammar_fill-large-vocab-cpu.txt).
    One core stays for the engine loop."""
    if serial_s < MULTI_THREAD_ABOVE_S or cpus < 3:
        return 1
    return min(MAX_FILL_THREADS, cpus - 1)


class FillThreads:
    """The thread count of each batch fill: serial while fills are cheap, threaded once one is not,
    with a serial fill every PROBE_EVERY fills to notice when they turn cheap again."""

    def __init__(self, cpus: int) -> None:
        self.cpus = cpus
        self.serial_s = 0.0
        self.fills = 0

    def next(self) -> int:
        if FILL_THREADS is not None:
            return FILL_THREADS
        if self.fills % PROBE_EVERY == 0:
            return 1
        return threads_for_fill(self.serial_s, self.cpus)

    def took(self, threads: int, seconds: float) -> None:
        if threads == 1:
            self.serial_s = seconds
        self.fills += 1


_fill_threads = FillThreads(len(os.sched_getaffinity(0)))


def fill_masks(
    rows: Sequence[tuple[int, GrammarState]],
    bitmask: torch.Tensor,
    tokens: Sequence[tuple[Sequence[int], int, int | None]],
) -> None:
    """Advance each row's grammar by its new tokens (`tokens[k]`: token_ids, num_prompt_tokens,
    pending, as `GrammarState.new_tokens` takes them) and write the tokens allowed next into
    `bitmask[row]`. Batched: xgrammar accepts the tokens and fills the rows in one call each, and
    each vocabulary mask goes to all its rows in one tensor operation (row by row in Python, the
    per-row calls and tensor operations cost more than xgrammar's own work)."""
    import torch
    import xgrammar as xgr

    live: list[tuple[int, GrammarState]] = []
    one: list[tuple[int, GrammarState, int]] = []  # rows with one new token: the usual decode step
    for (row, state), (token_ids, num_prompt_tokens, pending) in zip(rows, tokens, strict=True):
        if state.ended:
            continue
        new = state.new_tokens(token_ids, num_prompt_tokens, pending)
        if len(new) == 1:
            one.append((row, state, new[0]))
        elif state.advance(new):
            live.append((row, state))
    if one:
        matchers, new_tokens = [state.matcher for _, state, _ in one], [token for _, _, token in one]
        for (row, state, token), accepted in zip(
            one, xgr.BatchGrammarMatcher.batch_accept_token(matchers, new_tokens), strict=True
        ):
            state.took(token, accepted)
            if not state.ended:
                live.append((row, state))
    if not live:
        return
    threads = _fill_threads.next()
    started = time.perf_counter()
    _batch_matcher(threads).batch_fill_next_token_bitmask(
        [state.matcher for _, state in live], bitmask, [row for row, _ in live]
    )
    _fill_threads.took(threads, time.perf_counter() - started)
    by_masks: dict[int, tuple[VocabMasks, list[int], list[int]]] = {}
    for row, state in live:
        _, at, choices = by_masks.setdefault(id(state.masks), (state.masks, [], []))
        at.append(row)
        choices.append(state.masks.choice(state.last))
    for masks, at, choices in by_masks.values():
        index = torch.tensor(at)
        bitmask[index] &= masks.table[torch.tensor(choices)]


# UTF-8 lead bytes whose first continuation byte has a narrower range than 0x80-0xBF (no overlong
# forms, no surrogates, nothing past U+10FFFF), and bytes that appear in no valid UTF-8 text.
_FIRST_CONTINUATION = {0xE0: range(0xA0, 0xC0), 0xED: range(0x80, 0xA0), 0xF0: range(0x90, 0xC0),
                       0xF4: range(0x80, 0x90)}  # fmt: skip
_NEVER_UTF8 = frozenset({0xC0, 0xC1}) | frozenset(range(0xF5, 0x100))
_CONTROLS = frozenset(range(0x20))


@dataclass
class VocabMasks:
    """Bitmask rows (xgrammar's layout: bit t % 32 of int32 word t // 32) of the tokens that may
    follow a token: none with a control byte (beyond those allowed) or a byte never in UTF-8, none
    holding an invalid lead/continuation pair, and after a token that ends in a lead byte of
    `_FIRST_CONTINUATION`, only tokens that continue it validly. Special tokens such as EOS decode
    to their text and stay."""

    anywhere: torch.Tensor
    after_lead: dict[int, torch.Tensor]
    last_byte: list[int]  # per token, -1 for none
    table: torch.Tensor = field(init=False)  # [1 + leads, words]: anywhere, then after each lead
    _choice: dict[int, int] = field(init=False)  # lead byte -> its row in `table`

    def __post_init__(self) -> None:
        import torch

        self.table = torch.stack([self.anywhere, *self.after_lead.values()])
        self._choice = {lead: i + 1 for i, lead in enumerate(self.after_lead)}

    @classmethod
    def of(
        cls, decoded_vocab: Sequence[bytes], vocab_size: int, allowed_controls: frozenset[int] = frozenset()
    ) -> VocabMasks:
        vocab = list(decoded_vocab[:vocab_size])
        never = _NEVER_UTF8 | (_CONTROLS - allowed_controls)
        ok = [_valid_bytes(text, never) for text in vocab]
        after_lead = {
            lead: _bitmask_row(
                [good and (not text or text[0] in valid) for good, text in zip(ok, vocab, strict=True)],
                vocab_size,
            )
            for lead, valid in _FIRST_CONTINUATION.items()
        }
        last = [text[-1] if text else -1 for text in vocab] + [-1] * (vocab_size - len(vocab))
        return cls(_bitmask_row(ok, vocab_size), after_lead, last)

    def choice(self, token: int) -> int:
        """Which row of `table` holds the tokens allowed after `token` (-1: at the start)."""
        lead = self.last_byte[token] if 0 <= token < len(self.last_byte) else -1
        return self._choice.get(lead, 0)


def _valid_bytes(text: bytes, never: frozenset[int]) -> bool:
    if any(byte in never for byte in text):
        return False
    return all(
        text[i + 1] in _FIRST_CONTINUATION[byte]
        for i, byte in enumerate(text[:-1])
        if byte in _FIRST_CONTINUATION
    )


def _bitmask_row(allowed: list[bool], vocab_size: int) -> torch.Tensor:
    import torch

    words = [0xFFFFFFFF] * ((vocab_size + 31) // 32)  # tokens past the tokenizer's: the grammar decides
    for token, good in enumerate(allowed):
        if not good:
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
