"""Host cost of turning each step's tokens into text (issue #20): the engine's detokenizer
(tokenizers' DecodeStream, one call per row) against the batched window decode it replaced, measured
in the same run, with and without a grammar fill between steps.

The GPU profile of constrained decoding (structured_outputs-h100-run4-8b-shape-cprofile.txt) spent
5.4 ms a step in `decode_batch` at 100 % constrained and 0.5 ms at 0 %: tokenizers' batched decode
wakes its thread pool every call, and after a grammar fill (host work between two decodes) that
costs several times the decoding. This bench replays that pattern on the host: 128 rows, 64 steps,
a byte-level BPE trained on the Python standard library, tokens drawn uniformly (free) or from each
row's xgrammar mask of a 1,000-character string schema (constrained), median of 5 runs.

    .venv/bin/python bench/detokenize.py --out bench/results/detokenize.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import xgrammar as xgr
from structured_outputs import LONG_SCHEMA, large_vocab_tokenizer
from tokenizers import Tokenizer as HFTokenizer
from transformers import PreTrainedTokenizerFast

from kiln_engine.testing.tiny import SPECIAL_TOKENS
from kiln_engine.tokenizer import IncrementalDetokenizer, Tokenizer

ROWS, STEPS, RUNS = 128, 64, 5
PROMPT = [1, 2, 3]


class BatchedWindows:
    """The detokenizer the engine had before: a short window per row, all rows decoded in two
    `decode_batch` calls a step (the baseline)."""

    def __init__(self, tk: HFTokenizer) -> None:
        self.tk = tk
        self.ids: list[int] = list(PROMPT)
        self.read = len(self.ids)

    @staticmethod
    def add_batch(rows: list[BatchedWindows], tokens: list[int]) -> None:
        for row, token in zip(rows, tokens, strict=True):
            row.ids.append(token)
        windows = [r.ids[: r.read] for r in rows] + [r.ids for r in rows]
        texts = rows[0].tk.decode_batch(windows, skip_special_tokens=True)
        for i, row in enumerate(rows):
            prefix, full = texts[i], texts[len(rows) + i]
            if len(full) > len(prefix) and not full.endswith("\ufffd"):
                row.ids = row.ids[row.read :]
                row.read = len(row.ids)


def allowed_tokens(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    bits = (bitmask.unsqueeze(1) >> torch.arange(32, dtype=torch.int32)) & 1
    return torch.nonzero(bits.flatten()[:vocab]).flatten()


def detokenizer(tk: HFTokenizer, method: str) -> Callable[[list[int]], object]:
    """Each step's tokens -> text, for ROWS rows, by `method` (stream: the engine's; batched: before)."""
    if method == "stream":
        ours = Tokenizer(tk)
        streams = [IncrementalDetokenizer(ours, PROMPT) for _ in range(ROWS)]
        return lambda tokens: [d.add(t) for d, t in zip(streams, tokens, strict=True)]
    rows = [BatchedWindows(tk) for _ in range(ROWS)]
    return lambda tokens: BatchedWindows.add_batch(rows, tokens)


def one_run(tk: HFTokenizer, grammar: Any, vocab: int, constrained: bool, method: str, seed: int) -> float:
    """Seconds of detokenizing per step (the grammar fill and the draws are not counted)."""
    rng = random.Random(seed)
    matchers = [xgr.GrammarMatcher(grammar) for _ in range(ROWS)]
    bitmask = xgr.allocate_token_bitmask(ROWS, vocab)
    filler = xgr.BatchGrammarMatcher(max_threads=1)
    detokenize = detokenizer(tk, method)
    spent = 0.0
    for _ in range(STEPS):
        if constrained:
            filler.batch_fill_next_token_bitmask(matchers, bitmask, list(range(ROWS)))
            tokens = []
            for row, matcher in enumerate(matchers):
                allowed = allowed_tokens(bitmask[row], vocab)
                tokens.append(int(allowed[rng.randrange(len(allowed))]))
                matcher.accept_token(tokens[-1])
        else:
            tokens = [rng.randrange(len(SPECIAL_TOKENS), vocab) for _ in range(ROWS)]
        started = time.perf_counter()
        detokenize(tokens)
        spent += time.perf_counter() - started
    return spent / STEPS


def table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        f"{'tokens':12s} {'batched (before) ms/step':>25s} {'stream (engine) ms/step':>24s} {'ratio':>6s}"
    ]
    for r in rows:
        lines.append(f"{r['tokens']:12s} {r['batched_ms']:25.2f} {r['stream_ms']:24.2f} {r['ratio']:5.2f}x")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=32_000, help="BPE vocabulary asked of the trainer")
    ap.add_argument("--out", type=Path, default=Path("bench/results/detokenize.json"))
    args = ap.parse_args()
    tk = large_vocab_tokenizer(args.vocab)
    vocab = tk.get_vocab_size()
    info = xgr.TokenizerInfo.from_huggingface(
        PreTrainedTokenizerFast(tokenizer_object=tk), vocab_size=vocab, stop_token_ids=[2]
    )
    grammar = xgr.GrammarCompiler(info, max_threads=1).compile_json_schema(json.dumps(LONG_SCHEMA))
    print(f"{vocab}-token BPE; {ROWS} rows x {STEPS} steps, median of {RUNS} runs", flush=True)
    rows = []
    for constrained in (False, True):
        times: dict[str, list[float]] = {"batched": [], "stream": []}
        for run in range(RUNS):  # interleaved, so load from elsewhere falls on both alike
            for method in times:
                times[method].append(one_run(tk, grammar, vocab, constrained, method, seed=run))
        batched, stream = (statistics.median(times[m]) * 1e3 for m in ("batched", "stream"))
        rows.append({
            "tokens": "constrained" if constrained else "free",
            "batched_ms": round(batched, 3), "stream_ms": round(stream, 3),
            "ratio": round(batched / stream, 2),
            "runs_ms": {m: [round(t * 1e3, 3) for t in v] for m, v in times.items()},
        })  # fmt: skip
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(table(rows))
    result = {
        "what": __doc__.split("\n\n")[0] if __doc__ else "",
        "command": "python bench/detokenize.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        "host": {
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
            "python": platform.python_version(),
        },
        "vocab_size": vocab,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
