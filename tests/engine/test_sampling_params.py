"""Sampling parameters that change the logits (penalties, logit_bias, min_tokens, stop_token_ids): their
effect on a tiny model's tokens, the batched adjustment against a per-row reference, and rows of a
mixed batch not affecting each other. Both with plain steps and with lookahead decode steps.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kiln_engine.config import EngineConfig
from kiln_engine.engine import LLMEngine
from kiln_engine.interface import SamplingParams
from kiln_engine.sampler import Sampler, SampleRequest
from kiln_engine.testing import make_tiny_checkpoint

pytestmark = pytest.mark.engine

STEP_MODES = {"plain": {}, "lookahead": {"cuda_graphs": True, "lookahead_decode": True}}
LENGTH = 24


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), "qwen3")


@pytest.fixture(scope="module", params=list(STEP_MODES))
def engine(ckpt: Path, request: pytest.FixtureRequest) -> LLMEngine:
    return LLMEngine(ckpt, EngineConfig(num_kv_blocks=64, block_size=4, **STEP_MODES[request.param]))


@pytest.fixture(scope="module")
def prompt(engine: LLMEngine) -> list[int]:
    assert engine.tokenizer is not None
    return engine.tokenizer.encode("Hello, world! How are you")


def greedy(**kwargs: object) -> SamplingParams:
    return SamplingParams(**{"max_tokens": LENGTH, "temperature": 0.0, "ignore_eos": True, **kwargs})  # type: ignore[arg-type]


def generate(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> list[int]:
    return engine.generate([prompt], params)[0]


def a_token_not_in(engine: LLMEngine, *seen: list[int]) -> int:
    used = {t for s in seen for t in s} | engine.eos_token_ids
    return next(t for t in range(10, engine.model_config.vocab_size) if t not in used)


def test_logit_bias_forces_and_forbids_tokens(engine: LLMEngine, prompt: list[int]) -> None:
    base = generate(engine, prompt, greedy())
    forced = a_token_not_in(engine, base, prompt)
    assert generate(engine, prompt, greedy(logit_bias=((forced, 100.0),))) == [forced] * LENGTH
    sampled = SamplingParams(
        max_tokens=8, temperature=1.0, seed=1, ignore_eos=True, logit_bias=((forced, 100.0),)
    )
    assert generate(engine, prompt, sampled) == [forced] * 8
    banned = generate(engine, prompt, greedy(logit_bias=tuple((t, -100.0) for t in set(base))))
    assert not set(banned) & set(base)


def test_presence_penalty_is_once_frequency_penalty_grows(engine: LLMEngine, prompt: list[int]) -> None:
    """A token pushed up by +5 keeps winning under a one-off presence penalty of 2, but a frequency
    penalty of 2 per occurrence overtakes the push after a few repeats."""
    base = generate(engine, prompt, greedy())
    pushed = a_token_not_in(engine, base, prompt)
    bias = ((pushed, 5.0),)
    assert generate(engine, prompt, greedy(logit_bias=bias)) == [pushed] * LENGTH
    assert generate(engine, prompt, greedy(logit_bias=bias, presence_penalty=2.0)) == [pushed] * LENGTH
    by_frequency = generate(engine, prompt, greedy(logit_bias=bias, frequency_penalty=2.0))
    assert 1 < by_frequency.count(pushed) < LENGTH // 2
    # and a negative penalty rewards repeats: the first token of the output comes back
    repeated = generate(engine, prompt, greedy(presence_penalty=-2.0))
    assert len(set(repeated)) < len(set(base))


def test_repetition_penalty_discourages_prompt_and_output_tokens(
    engine: LLMEngine, prompt: list[int]
) -> None:
    base = generate(engine, prompt, greedy())
    assert len(set(base)) < LENGTH, "precondition: the unpenalized output repeats a token"
    penalized = generate(engine, prompt, greedy(repetition_penalty=2.0))
    assert len(set(penalized)) == LENGTH
    # it counts the prompt too: a prompt token pushed up just enough to win is held down
    echo = prompt[-1]
    push = smallest_winning_bias(engine, prompt, echo)
    assert generate(engine, prompt, greedy(max_tokens=1, logit_bias=((echo, push),))) == [echo]
    held = greedy(max_tokens=1, logit_bias=((echo, push),), repetition_penalty=1.5)
    assert generate(engine, prompt, held) != [echo]


def smallest_winning_bias(engine: LLMEngine, prompt: list[int], token: int) -> float:
    """The logit bias (to 0.01) that just makes `token` the greedy first pick (bisection)."""
    lo, hi = 0.0, 20.0
    while hi - lo > 0.01:
        mid = (lo + hi) / 2
        if generate(engine, prompt, greedy(max_tokens=1, logit_bias=((token, mid),))) == [token]:
            hi = mid
        else:
            lo = mid
    return hi


def test_min_tokens_holds_back_eos_and_stop_tokens(engine: LLMEngine, prompt: list[int]) -> None:
    eos = min(engine.eos_token_ids)
    to_eos = SamplingParams(max_tokens=LENGTH, temperature=0.0, logit_bias=((eos, 100.0),))
    assert generate(engine, prompt, to_eos) == [eos]
    held = generate(engine, prompt, SamplingParams(**{**_fields(to_eos), "min_tokens": 5}))
    assert len(held) == 6 and held[-1] == eos and eos not in held[:-1]
    stop = a_token_not_in(engine, prompt)
    to_stop = greedy(logit_bias=((stop, 100.0),), stop_token_ids=(stop,))
    assert generate(engine, prompt, to_stop) == [stop]
    held = generate(engine, prompt, SamplingParams(**{**_fields(to_stop), "min_tokens": 3}))
    assert len(held) == 4 and held[-1] == stop


def test_stop_token_ids_end_the_output(engine: LLMEngine, prompt: list[int]) -> None:
    base = generate(engine, prompt, greedy())
    stopped = generate(engine, prompt, greedy(stop_token_ids=(base[3],)))
    assert stopped == base[: base.index(base[3]) + 1]


def test_rows_of_a_mixed_batch_do_not_affect_each_other(engine: LLMEngine, prompt: list[int]) -> None:
    other = prompt[::-1]
    cases = [
        (prompt, greedy()),
        (other, greedy(frequency_penalty=1.5, presence_penalty=0.5)),
        (prompt, greedy(repetition_penalty=1.8)),
        (other, greedy(logit_bias=((42, 3.0), (43, -100.0)))),
        (prompt, SamplingParams(max_tokens=LENGTH, temperature=0.8, seed=5, frequency_penalty=1.0)),
        (other, SamplingParams(max_tokens=LENGTH, temperature=1.0, top_k=20, seed=9)),
        (prompt, greedy(min_tokens=4, logit_bias=((min(engine.eos_token_ids), 100.0),), ignore_eos=False)),
    ]
    alone = [generate(engine, p, params) for p, params in cases]
    together = engine.generate([p for p, _ in cases], [params for _, params in cases])
    assert together == alone


def _fields(params: SamplingParams) -> dict[str, object]:
    return {
        name: getattr(params, name)
        for name in SamplingParams.__dataclass_fields__
        if SamplingParams.__dataclass_fields__[name].init
    }


# ----------------------------------------------------------------------------- the batched adjustment


def reference(logits: torch.Tensor, req: SampleRequest, eos: frozenset[int]) -> torch.Tensor:
    """One row adjusted the slow, obvious way."""
    p, out = req.params, logits.clone()
    generated = list(req.token_ids[req.num_prompt_tokens :])
    for tok in set(req.token_ids):
        if p.repetition_penalty != 1.0:
            out[tok] = out[tok] / p.repetition_penalty if out[tok] > 0 else out[tok] * p.repetition_penalty
    for tok in set(generated):
        out[tok] -= p.frequency_penalty * generated.count(tok) + p.presence_penalty
    for tok, bias in p.logit_bias:
        out[tok] += bias
    if len(generated) < p.min_tokens:
        for tok in set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos)):
            out[tok] = float("-inf")
    return out


def test_the_batched_adjustment_matches_a_per_row_reference() -> None:
    vocab, eos = 50, frozenset({1})
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, vocab, generator=gen) * 3
    prompt = [5, 6, 7, 5]
    reqs = [
        SampleRequest("plain", SamplingParams(temperature=0), [*prompt, 8, 8], len(prompt)),
        SampleRequest("rep", SamplingParams(repetition_penalty=1.7), [*prompt, 8, 9], len(prompt)),
        SampleRequest("freq", SamplingParams(frequency_penalty=0.7, presence_penalty=-0.4),
                      [*prompt, 8, 8, 9, 8], len(prompt)),
        SampleRequest("bias", SamplingParams(logit_bias=((3, 2.5), (4, -100.0))), prompt, len(prompt)),
        SampleRequest("min", SamplingParams(min_tokens=3, stop_token_ids=(2,)), [*prompt, 8], len(prompt)),
        SampleRequest("all", SamplingParams(min_tokens=9, repetition_penalty=0.5, frequency_penalty=1.0,
                                            logit_bias=((7, 1.0),), ignore_eos=True), [*prompt, 7], 4),
    ]  # fmt: skip
    batch = Sampler(torch.device("cpu"), eos_token_ids=eos).prepare(reqs, vocab)
    assert batch.adjustment is not None
    adjusted = batch.adjustment.apply(logits)
    expected = torch.stack([reference(logits[i], r, eos) for i, r in enumerate(reqs)])
    torch.testing.assert_close(adjusted, expected)
    assert torch.equal(adjusted[0], logits[0])  # a row that asked for nothing is untouched


def test_requests_without_adjustments_keep_the_fast_path() -> None:
    sampler = Sampler(torch.device("cpu"), eos_token_ids=frozenset({1}))
    plain = [SampleRequest(str(i), SamplingParams(temperature=0), [5, 6], 2) for i in range(4)]
    fast = sampler.prepare(plain, 50)
    assert fast.all_greedy and fast.adjustment is None and fast.temperatures is None
    # min_tokens already reached: nothing to adjust this step
    done = SampleRequest("d", SamplingParams(temperature=0, min_tokens=1), [5, 6, 9], 2)
    assert sampler.prepare([*plain, done], 50).adjustment is None
