"""Host cost of grammar masks at 128 rows (issue #20): xgrammar's fill row by row against its batch
fill with 1, 2, 4, 8 and 'auto' threads, for a 1,000-character string schema and a JSON object
schema, and the cost of applying a bitmask on the GPU (xgrammar's kernel against unpacking it in
torch).

    PYTHONPATH=engine-image python bench/grammar_fill.py     # the apply rows need a CUDA device
    PYTHONPATH=engine-image python bench/grammar_fill.py --large-vocab

Tiny random Llama checkpoint (vocabulary 384); medians of 30 calls (200 for one row). With
`--large-vocab`, the tokenizer is structured_outputs.py's byte-level BPE of up to 128,000 tokens
trained on this machine's Python standard library (the model's weights are random), so the fills
cost what they would at a Llama 3-sized vocabulary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import xgrammar as xgr

from kiln_engine.config import EngineConfig
from kiln_engine.engine import LLMEngine
from kiln_engine.testing.tiny import make_tiny_checkpoint

sys.path.insert(0, os.path.dirname(__file__))
from structured_outputs import with_large_vocab

ROWS = 128
SCHEMAS = {
    "long": {"type": "string", "minLength": 1000},
    "object": {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
        "required": ["a", "b"],
    },
}
STARTS = {"long": '"', "object": '{"a'}  # text each matcher has accepted before the fills


def median_us(fn: Callable[[], Any], calls: int = 30) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[calls // 2] * 1e6


def fills(engine: LLMEngine, name: str) -> torch.Tensor:
    assert engine.grammars is not None
    vocab = engine.grammars.vocab_size
    matchers = [
        engine.grammars.state(("json_schema", json.dumps(SCHEMAS[name]))).matcher for _ in range(ROWS)
    ]
    assert engine.tokenizer is not None
    for matcher in matchers:
        for token in engine.tokenizer.encode(STARTS[name], add_special_tokens=False):
            assert matcher.accept_token(token)
    bitmask = xgr.allocate_token_bitmask(ROWS, vocab)

    def row_by_row() -> None:
        for i, matcher in enumerate(matchers):
            matcher.fill_next_token_bitmask(bitmask, i)

    print(f"{name:7s} row by row        {median_us(row_by_row):7.0f} us")
    for threads in (1, 2, 4, 8, "auto"):
        batch = xgr.BatchGrammarMatcher(max_threads=threads)

        def batch_fill(b: xgr.BatchGrammarMatcher = batch) -> None:
            b.batch_fill_next_token_bitmask(matchers, bitmask)

        cost = median_us(batch_fill)
        print(f"{name:7s} batch, {threads!s:4s} threads {cost:7.0f} us")
    one = median_us(lambda: matchers[0].fill_next_token_bitmask(bitmask, 0), 200)
    print(f"{name:7s} one row           {one:7.1f} us")
    main_thread_beside_fills(name, matchers, bitmask)
    return bitmask


def main_thread_beside_fills(name: str, matchers: list[Any], bitmask: torch.Tensor) -> None:
    """Whether a batch fill on another thread lets this one run (the engine's fill thread relies on
    it): this thread's longest pause during 20 serial fills, against one fill's time. Holding the GIL,
    the fill would pause it for about a fill each time."""
    batch = xgr.BatchGrammarMatcher(max_threads=1)
    fill_us = median_us(lambda: batch.batch_fill_next_token_bitmask(matchers, bitmask), 5)
    done = threading.Event()

    def fills() -> None:
        for _ in range(20):
            batch.batch_fill_next_token_bitmask(matchers, bitmask)
        done.set()

    pauses = []
    worker = threading.Thread(target=fills)
    worker.start()
    last = time.perf_counter()
    while not done.is_set():
        now = time.perf_counter()
        pauses.append(now - last)
        last = now
    worker.join()
    longer = sum(p * 1e6 > fill_us / 2 for p in pauses)
    print(
        f"{name:7s} beside a fill thread: main thread ran {len(pauses)} rounds, longest pause "
        f"{max(pauses) * 1e6:.0f} us, {longer} pauses over half a fill ({fill_us:.0f} us)"
    )


def applies(bitmask: torch.Tensor, vocab: int) -> None:
    logits = torch.randn(ROWS, vocab, device="cuda")
    on_device = bitmask.cuda()
    shifts = torch.arange(32, device="cuda", dtype=torch.int32)

    def with_xgrammar() -> None:
        xgr.apply_token_bitmask_inplace(logits, on_device)

    def unpacked_in_torch() -> None:
        bits = (on_device.unsqueeze(-1) >> shifts) & 1
        logits.masked_fill_(bits.flatten(1)[:, :vocab] == 0, float("-inf"))

    for name, fn in (("xgrammar apply", with_xgrammar), ("torch unpack apply", unpacked_in_torch)):
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(100):
            fn()
        host = (time.perf_counter() - start) / 100 * 1e6
        torch.cuda.synchronize()
        synced = (time.perf_counter() - start) / 100 * 1e6
        print(f"{name:20s} host {host:6.1f} us/call, with sync {synced:6.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--large-vocab", action="store_true", help="a 128,000-token BPE, random weights")
    args = parser.parse_args()
    checkpoint = make_tiny_checkpoint("/tmp/kiln-fill-ckpt", "llama", seed=3, max_position_embeddings=1024)
    extra: dict[str, Any] = {}
    if args.large_vocab:
        with_large_vocab(checkpoint, {})
        extra = {"load_format": "dummy"}
    config = EngineConfig(
        device="cpu", max_model_len=1024, num_kv_blocks=256, block_size=16, max_num_seqs=8, **extra
    )
    engine = LLMEngine(checkpoint, config)
    print("cpus", os.cpu_count(), "vocabulary", engine.grammars.vocab_size if engine.grammars else None)
    print("torch threads", torch.get_num_threads())
    bitmask = torch.empty(0)
    for name in SCHEMAS:
        bitmask = fills(engine, name)
    if torch.cuda.is_available():
        assert engine.grammars is not None
        applies(bitmask, engine.grammars.vocab_size)


if __name__ == "__main__":
    main()
