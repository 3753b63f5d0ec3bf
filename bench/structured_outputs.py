"""Cost of grammar-constrained decoding (issue #20): throughput of a batch with 0%, 25% and 100% of
its requests under a JSON-schema mask, against the unconstrained batch measured in the same run,
plus the gates fixed before measuring: a mixed batch gives every request the tokens it gets alone,
and every constrained output parses and meets its schema.

    PYTHONPATH=engine-image python bench/structured_outputs.py --device cuda --out results/so.json

The last row is 100% constrained again with the masks filled on the engine's thread before the
bookkeeping of the step before, as before 2026-12-06, instead of on the sampler's fill thread during
it (engine.DEFER_GRAMMAR_MASKS; lookahead steps only, so on the GPU: on CPU this bench runs plain
steps and both rows do the same).

Tiny random Llama checkpoint (made here), 128 requests x 128 new tokens, best of 3. The 'long'
schema (a string of at least 1,000 characters) keeps every constrained request going to max_tokens,
so each row decodes the same number of tokens.

`--model llama3-8b-shape` (GPU): the tiny model's forward takes almost no time and its tokenizer has
384 tokens, so its ratio is host overhead against an empty step. This model has Llama 3 8B's
layers with random bf16 weights (`load_format: dummy`, nothing downloaded) and a byte-level BPE
of 128,000 tokens trained here on this machine's Python standard library sources, so both the
forward and the grammar engine's per-token work are the size users' are.
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch
from host import host_info
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import kiln_engine.engine
from kiln_engine import grammar
from kiln_engine.config import EngineConfig
from kiln_engine.engine import LLMEngine
from kiln_engine.interface import SamplingParams
from kiln_engine.testing.tiny import SPECIAL_TOKENS, make_tiny_checkpoint

OBJECT_SCHEMA = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 99},
        "b": {"type": "string", "maxLength": 6},
        "c": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 3},
    },
    "required": ["a", "b", "c"],
    "additionalProperties": False,
}
LONG_SCHEMA = {"type": "string", "minLength": 1000}
SHARES = (0.0, 0.25, 1.0)


LARGE_VOCAB = 128_000
LLAMA3_8B_LAYERS = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "rope_theta": 500000.0,
    "torch_dtype": "bfloat16",
}


def _is_utf8(path: Path) -> bool:
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def large_vocab_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level BPE of `vocab_size` tokens with the tiny model's special tokens at the same ids,
    trained on this machine's Python standard library sources (about 30 MB, sorted: reproducible;
    the few that are not UTF-8, which the trainer refuses, left out)."""
    files = [f for f in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")) if _is_utf8(f)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(f) for f in files], trainer=trainer)
    return tok


def with_large_vocab(checkpoint: Path, layers: dict[str, Any]) -> None:
    """Give `checkpoint` the large-vocabulary tokenizer and `layers`' shape; its weights go (load it
    with `load_format: dummy`)."""
    started = time.perf_counter()
    tok = large_vocab_tokenizer(LARGE_VOCAB)
    (checkpoint / "tokenizer.json").write_text(tok.to_str())
    config = json.loads((checkpoint / "config.json").read_text())
    config.update(layers, vocab_size=tok.get_vocab_size())
    (checkpoint / "config.json").write_text(json.dumps(config, indent=1))
    (checkpoint / "model.safetensors").unlink(missing_ok=True)
    print(f"{tok.get_vocab_size()}-token tokenizer trained in {time.perf_counter() - started:.0f} s")


def engine_for(device: str, model: str = "tiny") -> LLMEngine:
    checkpoint = make_tiny_checkpoint("/tmp/kiln-so-ckpt", "llama", seed=3, max_position_embeddings=1024)
    fast: dict[str, Any] = {"cuda_graphs": True, "lookahead_decode": True} if device == "cuda" else {}
    extra: dict[str, Any] = {}
    if model == "llama3-8b-shape":
        with_large_vocab(checkpoint, LLAMA3_8B_LAYERS)
        extra = {"load_format": "dummy", "dtype": "bfloat16"}
    config = EngineConfig(
        device=device,
        max_model_len=1024,
        num_kv_blocks=4096,
        block_size=16,
        max_num_seqs=256,
        **fast,
        **extra,
    )
    return LLMEngine(checkpoint, config)


def gates(engine: LLMEngine, samples: int, check_mixed: bool = True) -> dict[str, Any]:
    """Mixed batch == each request alone (when `check_mixed`); every sampled schema output valid.

    The llama3-8b-shape model skips the first: its bf16 matrix products round differently at
    other batch sizes, and random weights leave near-ties that flip, whatever the masks do; the
    tiny float32 model holds that gate."""
    assert engine.tokenizer is not None
    prompt = engine.tokenizer.encode("Hello")
    schema = json.dumps(OBJECT_SCHEMA)
    cases = [
        SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, frequency_penalty=1.5),
        SamplingParams(max_tokens=200, temperature=1.0, seed=3, structured=("json_schema", schema)),
        SamplingParams(max_tokens=200, temperature=0, structured=("json_object", "")),
    ]
    same = None
    if check_mixed:
        alone = [engine.generate([prompt], case)[0] for case in cases]
        same = engine.generate([prompt] * len(cases), cases) == alone
    valid = 0
    for seed in range(samples):
        params = SamplingParams(
            max_tokens=200, temperature=1.0, seed=seed, structured=("json_schema", schema)
        )
        value = json.loads(engine.tokenizer.decode(engine.generate([prompt], params)[0]))
        if set(value) == {"a", "b", "c"} and 0 <= value["a"] <= 99 and len(value["b"]) <= 6:
            valid += len(value["c"]) <= 3
    return {"mixed_equals_alone": same, "valid": valid, "samples": samples}


def throughput(engine: LLMEngine, share: float, device: str, requests: int, tokens: int, reps: int) -> float:
    best = 0.0
    long_schema = json.dumps(LONG_SCHEMA)
    assert engine.tokenizer is not None
    prompts = [engine.tokenizer.encode(f"Request {i}: tell me") for i in range(requests)]
    for rep in range(reps):
        constrained = int(requests * share)
        params = [
            SamplingParams(
                max_tokens=tokens,
                temperature=1.0,
                seed=i + 1000 * rep,
                ignore_eos=i >= constrained,
                structured=("json_schema", long_schema) if i < constrained else None,
            )
            for i in range(requests)
        ]
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        outputs = engine.generate(prompts, params)
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, sum(len(o) for o in outputs) / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--seeded-noise",
        choices=("counter", "generator"),
        default="counter",
        help="Seeded rows' noise: one counter-based kernel (the CUDA default) or a generator per request.",
    )
    parser.add_argument("--model", choices=("tiny", "llama3-8b-shape"), default="tiny")
    parser.add_argument(
        "--fill-threads",
        type=int,
        default=grammar.FILL_THREADS,
        help="xgrammar's batch fill; by default the engine's choice (grammar.FillThreads)",
    )
    args = parser.parse_args()
    grammar.FILL_THREADS = args.fill_threads
    host_at_start = host_info()
    engine = engine_for(args.device, args.model)
    sampler = engine.runner.sampler
    sampler.counter_noise = sampler.counter_noise and args.seeded_noise == "counter"
    checked = gates(engine, args.samples, check_mixed=args.model == "tiny")
    print(
        f"gates: mixed batch equals alone: {checked['mixed_equals_alone']}; "
        f"schema outputs valid: {checked['valid']}/{checked['samples']}",
        flush=True,
    )
    throughput(engine, 0.0, args.device, args.requests, args.tokens, 1)  # warm-up: graphs, compiles
    rows = []
    for share, fill_thread in [*((share, True) for share in SHARES), (1.0, False)]:
        kiln_engine.engine.DEFER_GRAMMAR_MASKS = fill_thread
        rate = throughput(engine, share, args.device, args.requests, args.tokens, args.reps)
        rows.append({"constrained_share": share, "fill_thread": fill_thread, "tokens_per_s": round(rate, 1)})
    kiln_engine.engine.DEFER_GRAMMAR_MASKS = True
    baseline = rows[0]["tokens_per_s"]
    print(f"{'constrained':>12} {'masks filled on':>22} {'tok/s':>10} {'vs unconstrained':>17}")
    for row in rows:
        row["vs_unconstrained"] = round(row["tokens_per_s"] / baseline, 3)
        where = "the fill thread" if row["fill_thread"] else "the engine thread"
        print(
            f"{row['constrained_share']:>11.0%} {where:>22} {row['tokens_per_s']:>10.0f}"
            f" {row['vs_unconstrained']:>16.2f}x"
        )
    report = {
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "requests": args.requests,
        "tokens": args.tokens,
        "reps": args.reps,
        "model": args.model,
        "fill_threads": args.fill_threads,
        "vocab_size": engine.model_config.vocab_size,
        "gates": checked,
        "seeded_noise": "counter" if sampler.counter_noise else "generator",
        "rows": rows,
        "host_at_start": host_at_start,
        "load_average_at_end": host_info()["load_average"],
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
