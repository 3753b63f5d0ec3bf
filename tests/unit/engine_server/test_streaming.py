"""Stop strings and incremental detokenization (pure, with a real byte-level BPE tokenizer)."""

from __future__ import annotations

import pytest

from kiln_engine.server.streaming import IncrementalDetokenizer, StopMatcher, sse


def feed_all(stops: tuple[str, ...], pieces: list[str]) -> tuple[str, bool]:
    m = StopMatcher(stops)
    out = "".join(m.feed(piece, final=i == len(pieces) - 1) for i, piece in enumerate(pieces))
    return out, m.stopped


@pytest.mark.parametrize(
    ("stops", "pieces", "text", "stopped"),
    [
        ((), ["ab", "cd"], "abcd", False),
        (("cd",), ["ab", "cd", "ef"], "ab", True),
        (("cd",), ["abc", "def"], "ab", True),  # stop string split across deltas
        (("xyz",), ["ab", "xy"], "abxy", False),  # a partial match is released at the end
        (("b", "zz"), ["aaab", "zz"], "aaa", True),  # earliest match wins
        (("END",), ["E", "N", "D", "more"], "", True),
    ],
)
def test_stop_matcher(stops: tuple[str, ...], pieces: list[str], text: str, stopped: bool) -> None:
    assert feed_all(stops, pieces) == (text, stopped)


def test_stop_matcher_holds_back_a_possible_prefix() -> None:
    m = StopMatcher(("STOP",))
    assert m.feed("hello ST") == "hello "  # "ST" may still become "STOP"
    assert m.feed("AR") == "STAR"  # it did not
    assert m.feed("STO") == ""
    assert m.feed("P!") == "" and m.stopped and m.text == "hello STAR"


def test_incremental_detokenizer_round_trips_unicode() -> None:
    pytest.importorskip("torch")
    from tokenizers import Tokenizer

    from kiln_engine.testing.tiny import build_tokenizer_json

    tok = Tokenizer.from_str(build_tokenizer_json())

    class Dec:
        def decode(self, ids: list[int]) -> str:
            return str(tok.decode(ids, skip_special_tokens=True))

    text = "Café, naïve 東京 😀 and more"
    ids = tok.encode(text, add_special_tokens=False).ids
    detok = IncrementalDetokenizer(Dec())
    pieces = [detok.add([i]) for i in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_sse_framing() -> None:
    assert sse({"a": 1}) == b'data: {"a":1}\n\n'
    assert sse("[DONE]") == b"data: [DONE]\n\n"
