"""Engine behaviour beyond greedy parity: sampling controls, stops, logprobs, aborts, validation, text."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kiln_engine.config import EngineConfig
from kiln_engine.engine import LLMEngine, stop_holdback
from kiln_engine.interface import RequestOutput, SamplingParams
from kiln_engine.testing import make_tiny_checkpoint

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), "qwen3")


# Every behaviour holds both for plain steps and for decode steps padded to graph sizes with the
# next step enqueued before this one's tokens are read (lookahead; on CPU the "graphs" run eagerly).
STEP_MODES = {"plain": {}, "lookahead": {"cuda_graphs": True, "lookahead_decode": True}}


@pytest.fixture(params=list(STEP_MODES))
def mode(request: pytest.FixtureRequest) -> dict[str, bool]:
    return STEP_MODES[request.param]


@pytest.fixture
def engine(ckpt: Path, mode: dict[str, bool]) -> LLMEngine:
    return LLMEngine(ckpt, EngineConfig(num_kv_blocks=64, block_size=4, **mode))


def run(engine: LLMEngine) -> dict[str, list[RequestOutput]]:
    outs: dict[str, list[RequestOutput]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    return outs


def tokens(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def prompt(engine: LLMEngine, text: str = "Hello, world! How are you") -> list[int]:
    assert engine.tokenizer is not None
    return engine.tokenizer.encode(text)


def test_max_tokens_and_finish_reason(engine: LLMEngine) -> None:
    engine.add_request("a", prompt(engine), SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    outs = run(engine)["a"]
    assert len(tokens(outs)) == 5
    assert [o.finished for o in outs] == [False] * 4 + [True]
    assert outs[-1].finish_reason == "length" and outs[-1].completion_tokens == 5
    assert outs[-1].prompt_tokens == len(prompt(engine))


def test_seeded_sampling_is_reproducible_and_batch_independent(engine: LLMEngine) -> None:
    p = prompt(engine)
    sp = SamplingParams(max_tokens=12, temperature=1.0, seed=1234, ignore_eos=True)
    engine.add_request("x", p, sp)
    alone = tokens(run(engine)["x"])
    engine.add_request(
        "noise1", prompt(engine, "The quick brown fox"), SamplingParams(max_tokens=12, temperature=1.0)
    )
    engine.add_request("y", p, sp)
    engine.add_request("noise2", p, SamplingParams(max_tokens=3, temperature=0.7))
    batched = tokens(run(engine)["y"])
    assert alone == batched
    engine.add_request("z", p, SamplingParams(max_tokens=12, temperature=1.0, seed=99, ignore_eos=True))
    assert tokens(run(engine)["z"]) != alone


def test_top_k_one_and_tiny_top_p_are_greedy(engine: LLMEngine) -> None:
    p = prompt(engine)
    engine.add_request("g", p, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    engine.add_request("k", p, SamplingParams(max_tokens=8, temperature=1.5, top_k=1, ignore_eos=True))
    engine.add_request("p", p, SamplingParams(max_tokens=8, temperature=1.5, top_p=1e-6, ignore_eos=True))
    outs = run(engine)
    assert tokens(outs["k"]) == tokens(outs["g"]) == tokens(outs["p"])


def test_top_k_restricts_to_the_k_most_likely(engine: LLMEngine) -> None:
    p = prompt(engine)
    for i in range(6):
        engine.add_request(
            f"s{i}", p, SamplingParams(max_tokens=1, temperature=5.0, top_k=3, logprobs=3, seed=i)
        )
    outs = run(engine)
    for i in range(6):
        (o,) = outs[f"s{i}"]
        assert o.logprobs is not None
        assert o.new_token_ids[0] in o.logprobs[0].top  # among the 3 most likely


def test_logprobs_match_a_log_softmax_of_the_model(engine: LLMEngine) -> None:
    p = prompt(engine)
    engine.add_request("lp", p, SamplingParams(max_tokens=3, temperature=0, logprobs=4, ignore_eos=True))
    outs = run(engine)["lp"]
    lps = [lp for o in outs for lp in (o.logprobs or [])]
    assert len(lps) == 3
    for lp, tok in zip(lps, tokens(outs), strict=True):
        assert lp.token_id == tok
        assert len(lp.top) == 4
        assert max(lp.top, key=lambda t: lp.top[t]) == tok  # greedy picks the top one
        assert lp.logprob == pytest.approx(max(lp.top.values()))
        assert all(v <= 0 for v in lp.top.values())
        assert sum(torch.tensor(list(lp.top.values())).exp()) < 1.0


def test_stop_token_ids_and_eos(engine: LLMEngine) -> None:
    p = prompt(engine)
    engine.add_request("free", p, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    free = tokens(run(engine)["free"])
    stop_at = free[3]
    first = free.index(stop_at)
    engine.add_request("st", p, SamplingParams(max_tokens=10, temperature=0, stop_token_ids=(stop_at,)))
    outs = run(engine)["st"]
    assert tokens(outs) == free[: first + 1] and outs[-1].finish_reason == "stop"
    # The same token as the engine's eos id stops generation unless ignore_eos.
    engine.eos_token_ids = frozenset({stop_at})
    engine.add_request("eos", p, SamplingParams(max_tokens=10, temperature=0))
    assert tokens(run(engine)["eos"]) == free[: first + 1]


def test_stop_strings_truncate_text(engine: LLMEngine) -> None:
    assert engine.tokenizer is not None
    p = prompt(engine)
    engine.add_request("free", p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    outs = run(engine)["free"]
    text = "".join(o.text for o in outs)
    assert text == engine.tokenizer.decode(tokens(outs))
    assert len(text) >= 6
    stop = text[3:6]
    engine.add_request(
        "s", p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=(stop, "zzzz"))
    )
    souts = run(engine)["s"]
    assert souts[-1].finish_reason == "stop"
    assert "".join(o.text for o in souts) == text[: text.index(stop)]
    assert len(tokens(souts)) < 12


def test_stop_holdback() -> None:
    assert stop_holdback("hello wor", ("world",)) == 3
    assert stop_holdback("hello", ("xyz",)) == 0
    assert stop_holdback("ab", ("abc", "b")) == 2


def test_abort_frees_blocks_and_reports(engine: LLMEngine) -> None:
    p = prompt(engine)
    engine.add_request("a", p, SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    engine.add_request("b", p, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.stats().kv_blocks_used > 0
    engine.abort_request("a")
    outs = run(engine)
    assert outs["a"][-1].finished and outs["a"][-1].finish_reason == "abort"
    assert outs["b"][-1].finish_reason == "length"
    assert engine.stats().kv_blocks_used == 0 and not engine.has_unfinished()
    engine.abort_request("a")  # unknown/finished ids are ignored


def test_invalid_requests_are_rejected(engine: LLMEngine) -> None:
    p = prompt(engine)
    bad = [
        SamplingParams(max_tokens=0),
        SamplingParams(temperature=-1),
        SamplingParams(top_p=0),
        SamplingParams(top_k=-2),
        SamplingParams(logprobs=50),
        SamplingParams(stop=("",)),
    ]
    for i, sp in enumerate(bad):
        with pytest.raises(ValueError):
            engine.add_request(f"bad{i}", p, sp)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("e", [], SamplingParams())
    with pytest.raises(ValueError, match="context"):
        engine.add_request("long", [1] * engine.max_model_len, SamplingParams())
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request("oov", [10**6], SamplingParams())
    engine.add_request("dup", p, SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="in use"):
        engine.add_request("dup", p, SamplingParams(max_tokens=1))
    assert [s.request_id for s in engine.scheduler.waiting] == ["dup"]  # nothing rejected was queued


def test_context_limit_finishes_with_length(ckpt: Path, mode: dict[str, bool]) -> None:
    engine = LLMEngine(ckpt, EngineConfig(num_kv_blocks=64, block_size=4, max_model_len=20, **mode))
    p = prompt(engine)
    engine.add_request("c", p, SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    outs = run(engine)["c"]
    assert outs[-1].finish_reason == "length"
    assert len(p) + len(tokens(outs)) == 20


def test_stats_track_queue_and_cache(engine: LLMEngine) -> None:
    p = prompt(engine)
    for i in range(3):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    s = engine.stats()
    assert (s.waiting, s.running, s.kv_blocks_used, s.kv_blocks_total) == (3, 0, 0, 64)
    engine.step()
    s = engine.stats()
    assert s.running == 3 and s.waiting == 0 and s.kv_blocks_used > 0
    run(engine)
    assert engine.stats().prefix_cache_hit_tokens_total == 0  # all three arrived together
    engine.add_request("later", p, SamplingParams(max_tokens=1))
    outs = run(engine)["later"]
    assert outs[-1].cached_prompt_tokens > 0
    assert engine.stats().prefix_cache_hit_tokens_total == outs[-1].cached_prompt_tokens


def test_without_chunked_prefill_context_is_capped_by_the_step_budget(ckpt: Path) -> None:
    engine = LLMEngine(
        ckpt, EngineConfig(num_kv_blocks=64, block_size=4, chunked_prefill=False, max_tokens_per_step=24)
    )
    assert engine.max_model_len == 24  # a preempted sequence must be recomputable in one step
    p = prompt(engine)
    engine.add_request("c", p, SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    outs = run(engine)["c"]
    assert len(p) + len(tokens(outs)) == 24


def test_random_load_keeps_invariants_and_seeded_outputs(ckpt: Path, mode: dict[str, bool]) -> None:
    """Random arrivals, aborts and sampling settings under KV pressure, chunking and prefix caching.

    Every request finishes, every block comes back, and each seeded request produces exactly the
    tokens it produces when run alone (preemption and batch mates change nothing).
    """
    import random

    rng = random.Random(7)
    engine = LLMEngine(
        ckpt, EngineConfig(num_kv_blocks=16, block_size=4, max_tokens_per_step=10, max_num_seqs=5, **mode)
    )
    base = prompt(engine, "A paged key-value cache stores attention keys and values")
    requests: dict[str, tuple[list[int], SamplingParams]] = {}
    for i in range(14):
        p = base[: rng.randint(2, len(base))] + [rng.randint(5, 300) for _ in range(rng.randint(0, 6))]
        sp = SamplingParams(
            max_tokens=rng.randint(1, 20),
            temperature=rng.choice([0.0, 0.8, 1.3]),
            top_p=rng.choice([1.0, 0.9]),
            top_k=rng.choice([0, 20]),
            seed=rng.randint(0, 10**6),
            ignore_eos=True,
        )
        requests[f"q{i}"] = (p, sp)
    order = list(requests)
    got: dict[str, list[int]] = {}
    finished: dict[str, str | None] = {}
    aborted = {"q3", "q9"}
    step = 0
    while order or engine.has_unfinished():
        if order and rng.random() < 0.5:
            rid = order.pop(0)
            engine.add_request(rid, *requests[rid])
        if step in (5, 12):
            engine.abort_request("q3" if step == 5 else "q9")
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finished:
                finished[out.request_id] = out.finish_reason
        step += 1
        assert step < 2000
    assert set(finished) == set(requests)
    assert engine.stats().kv_blocks_used == 0
    assert engine.stats().preemptions_total > 0
    for rid, (p, sp) in requests.items():
        if rid in aborted and finished[rid] == "abort":
            continue
        assert finished[rid] == "length"
        assert len(got[rid]) == sp.max_tokens
        engine.add_request("solo", p, sp)
        assert tokens(run(engine)["solo"]) == got[rid], rid


def test_decode_graphs_on_gpu_choose_the_triton_kernel() -> None:
    from kiln_engine.model_runner import attention_backend_name

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert attention_backend_name(EngineConfig(cuda_graphs=True), gpu) == "triton"
    assert attention_backend_name(EngineConfig(cuda_graphs=True), cpu) == "auto"
    assert attention_backend_name(EngineConfig(), gpu) == "auto"
    with pytest.raises(ValueError, match="triton"):
        attention_backend_name(EngineConfig(cuda_graphs=True, attention_backend="torch"), gpu)


def test_lookahead_enqueues_the_next_decode_step_and_keeps_the_tokens(ckpt: Path) -> None:
    """In steady decoding the step after is enqueued before this one's tokens are read; greedy and
    seeded outputs, stop strings and EOS-free lengths are those of plain steps."""
    params = [
        SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=17, temperature=0.9, seed=5, ignore_eos=True),
        SamplingParams(max_tokens=30, temperature=0, stop=("o",)),
        SamplingParams(max_tokens=9, temperature=0, logprobs=2, ignore_eos=True),
    ]
    texts = ["Hello, world! How are you", "The quick brown fox", "Once upon a time", "A"]
    results = {}
    for name, cfg in STEP_MODES.items():
        engine = LLMEngine(ckpt, EngineConfig(num_kv_blocks=64, block_size=4, **cfg))
        for i, (t, sp) in enumerate(zip(texts, params, strict=True)):
            engine.add_request(f"r{i}", prompt(engine, t), sp)
        outs: dict[str, list[RequestOutput]] = {}
        looked_ahead = 0
        while engine.has_unfinished():
            for o in engine.step():
                outs.setdefault(o.request_id, []).append(o)
            looked_ahead += engine.in_flight is not None
        results[name] = (
            {rid: (tokens(o), "".join(x.text for x in o), o[-1].finish_reason) for rid, o in outs.items()},
            [lp for o in outs["r3"] for lp in (o.logprobs or [])],
        )
        assert (looked_ahead > 5) == (name == "lookahead"), (name, looked_ahead)
        assert engine.stats().kv_blocks_used == 0
    assert results["plain"][0] == results["lookahead"][0]
    plain_lp, ahead_lp = results["plain"][1], results["lookahead"][1]
    assert [lp.token_id for lp in plain_lp] == [lp.token_id for lp in ahead_lp]
    for a, b in zip(plain_lp, ahead_lp, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
