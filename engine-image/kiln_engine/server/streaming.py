"""Turning a request's token outputs into text: incremental detokenization, stop strings, and the
async stream of deltas (merged over a request's `n` choices) that both the streaming (SSE) and the
one-shot endpoints consume.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from kiln_engine.interface import RequestOutput, TokenLogprob
from kiln_engine.server.runner import EngineFailure, RequestHandle

T = TypeVar("T")


class Detokenizer(Protocol):
    """What the server needs from a tokenizer to turn ids back into text."""

    def decode(self, token_ids: list[int]) -> str: ...


class IncrementalDetokenizer:
    """Decodes a growing token sequence into text deltas without splitting multi-byte characters.

    Decodes a short window (from `prefix_offset`) so each step costs O(window), not O(sequence);
    text ending in U+FFFD (an incomplete UTF-8 sequence) is held back until the next token completes it.
    """

    CONTEXT = 5  # prompt tokens decoded along with the output, so a leading space survives

    def __init__(self, tokenizer: Detokenizer, prompt_ids: list[int] | None = None) -> None:
        self._tok = tokenizer
        self._ids: list[int] = list((prompt_ids or [])[-self.CONTEXT :])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def add(self, new_ids: list[int]) -> str:
        self._ids.extend(new_ids)
        prefix_text = self._tok.decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._tok.decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back, at the end of the sequence."""
        prefix_text = self._tok.decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._tok.decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""


class StopMatcher:
    """Applies OpenAI stop-string semantics: text ends before the first stop string, which is not
    returned; text that could still be the start of a stop string is held back until it cannot.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._holdback = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self._emitted = 0
        self.stopped = False

    def _partial_suffix(self) -> int:
        """Length of the longest end of the text that could still grow into a stop string."""
        longest = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:k]):
                    longest = k
                    break
        return longest

    def feed(self, delta: str, final: bool = False) -> str:
        """Add decoded text; return what may be emitted now. Sets `stopped` on a stop string."""
        if self.stopped:
            return ""
        search_from = max(0, len(self.text) - self._holdback)
        self.text += delta
        cut = -1
        for stop in self.stops:
            idx = self.text.find(stop, search_from)
            if idx != -1 and (cut == -1 or idx < cut):
                cut = idx
        if cut != -1:
            self.stopped = True
            out = self.text[self._emitted : cut]
            self.text = self.text[:cut]
            self._emitted = cut
            return out
        end = len(self.text) if final else max(self._emitted, len(self.text) - self._partial_suffix())
        out = self.text[self._emitted : end]
        self._emitted = end
        return out


@dataclass
class Delta:
    """What one engine output adds to a response: text, the tokens behind it, and maybe the end."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


async def deltas(
    handle: RequestHandle,
    tokenizer: Detokenizer,
    stops: tuple[str, ...],
    stop_early: Callable[[], None],
    eos_token_ids: frozenset[int] = frozenset(),
    prompt_ids: list[int] | None = None,
    engine_detokenizes: bool = False,
) -> AsyncIterator[Delta]:
    """Yield text deltas of one request until it finishes. Raises EngineFailure if the engine failed it.

    With `engine_detokenizes` the engine's own `text` (stop strings already applied) is used;
    otherwise text is decoded here and stop strings applied, `stop_early` ending the request in the
    engine when a stop string matched before the engine knew.
    """
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    matcher = StopMatcher(stops)
    completion_tokens = 0
    while True:
        item = await handle.queue.get()
        if isinstance(item, EngineFailure):
            raise item
        out: RequestOutput = item
        completion_tokens = out.completion_tokens or completion_tokens + len(out.new_token_ids)
        prompt_tokens = out.prompt_tokens or handle.prompt_tokens
        lps = out.logprobs or []
        reason = out.finish_reason if out.finished else None
        if engine_detokenizes:
            yield Delta(out.text, out.new_token_ids, lps, reason, prompt_tokens, completion_tokens)
            if out.finished:
                return
            continue
        visible = [t for t in out.new_token_ids if t not in eos_token_ids]
        text = detok.add(visible)
        if out.finished:
            text += detok.flush()
        emitted = matcher.feed(text, final=out.finished)
        if matcher.stopped:
            if not out.finished:
                stop_early()
            yield Delta(emitted, out.new_token_ids, lps, "stop", prompt_tokens, completion_tokens)
            return
        yield Delta(emitted, out.new_token_ids, lps, reason, prompt_tokens, completion_tokens)
        if out.finished:
            return


async def merge(streams: list[AsyncIterator[Delta]]) -> AsyncIterator[tuple[int, Delta]]:
    """The deltas of a request's choices as they come, each with its choice index; ends when all end.

    An EngineFailure of any choice ends the merge with it (the caller aborts the rest).
    """
    if len(streams) == 1:  # n=1, the common case: no tasks
        async for d in streams[0]:
            yield 0, d
        return
    pending = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=lambda t: pending[t]):
                i = pending.pop(task)
                try:
                    d = task.result()
                except StopAsyncIteration:
                    continue
                yield i, d
                pending[asyncio.ensure_future(anext(streams[i]))] = i
    finally:
        for task in pending:
            task.cancel()


def sse(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


SSE_DONE = sse("[DONE]")


class DisconnectWatch:
    """Asks `is_disconnected` at most every `interval_s`, however fast deltas arrive."""

    def __init__(self, is_disconnected: Callable[[], Awaitable[bool]], interval_s: float = 0.25) -> None:
        self._ask = is_disconnected
        self.interval_s = interval_s
        self._last = time.monotonic()

    async def gone(self, force: bool = False) -> bool:
        now = time.monotonic()
        if not force and now - self._last < self.interval_s:
            return False
        self._last = now
        return bool(await self._ask())


async def next_or_disconnect(gen: AsyncIterator[T], watch: DisconnectWatch) -> T | None:
    """The next item, or None if the client went away first (checked every `watch.interval_s`)."""
    if await watch.gone():
        return None
    task = asyncio.ensure_future(gen.__anext__())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=watch.interval_s)
            if done:
                return task.result()
            if await watch.gone(force=True):
                return None
    finally:
        if not task.done():
            task.cancel()
