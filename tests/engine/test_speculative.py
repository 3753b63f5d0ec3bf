"""N-gram speculative decoding: greedy outputs equal decoding without it, token for token, in mixed
batches; rejected drafts roll the paged KV cache (and the prefix cache) back; counters and config."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from kiln_engine.block_manager import BlockManager
from kiln_engine.config import EngineConfig
from kiln_engine.engine import LLMEngine
from kiln_engine.interface import SamplingParams
from kiln_engine.sequence import Sequence
from kiln_engine.speculative import accept_greedy, accept_sampled, propose_ngram
from kiln_engine.testing import make_tiny_checkpoint

pytestmark = pytest.mark.engine


def test_propose_ngram_takes_the_latest_longest_match() -> None:
    # suffix [1, 2] occurred twice; the later occurrence (followed by 7, 8) wins
    assert propose_ngram([1, 2, 5, 6, 1, 2, 7, 8, 9, 1, 2], k=2) == [7, 8]
    # no 2- or 3-gram match: falls back to the last token's latest earlier occurrence
    assert propose_ngram([4, 9, 3, 4], k=3) == [9, 3, 4]
    assert propose_ngram([1, 2, 3], k=3) == []
    assert propose_ngram([1, 1, 1], k=0) == []


def test_accept_greedy_keeps_drafts_up_to_the_first_mismatch() -> None:
    assert accept_greedy([5, 6, 7], [5, 6, 9, 1]) == [5, 6, 9]
    assert accept_greedy([5, 6], [5, 6, 8]) == [5, 6, 8]  # all accepted, plus the bonus token
    assert accept_greedy([5], [4, 3]) == [4]
    with pytest.raises(ValueError):
        accept_greedy([5], [5])


def test_rollback_withdraws_prefix_cache_entries_of_rejected_blocks() -> None:
    bm = BlockManager(8, 2)
    seq = Sequence("a", [1, 2, 3, 4, 5], SamplingParams())
    assert bm.allocate_slots(seq, 5)
    seq.num_computed_tokens = 5
    bm.register_computed_blocks(seq)  # blocks [1,2] and [3,4] published
    assert len(bm.cached) == 2
    bm.rollback(seq, 3)  # position 3 onward rejected: block [3,4] no longer holds those tokens
    assert len(bm.cached) == 1 and len(seq.block_hashes) == 1 and seq.num_computed_tokens == 3
    other = Sequence("b", [1, 2, 3, 4, 6], SamplingParams())
    assert bm.acquire_prefix(other) == 2  # only the surviving block is reused
    with pytest.raises(ValueError):
        bm.rollback(seq, 4)


def test_rejection_sampling_keeps_the_target_distribution() -> None:
    """Tolerance: total variation distance below 0.03 for the first token (8,000 draws: its
    expected value is about 0.008) and below 0.04 for the second given the first draft was kept."""
    import torch

    target = torch.tensor(
        [[0.1, 0.4, 0.2, 0.2, 0.1], [0.3, 0.3, 0.2, 0.1, 0.1], [0.2, 0.2, 0.2, 0.2, 0.2]], dtype=torch.float32
    )
    gen = torch.Generator().manual_seed(1)
    first = torch.zeros(5)
    second = torch.zeros(5)
    for _ in range(8_000):
        out = accept_sampled([1, 0], target, gen)
        first[out[0]] += 1
        if out[0] == 1:  # the first draft was kept (the residual never draws it)
            second[out[1]] += 1
    assert (
        0.5 * (first / first.sum() - target[0]).abs().sum() < 0.03
    )  # 0.24 if rejections could redraw the draft
    assert 0.5 * (second / second.sum() - target[1]).abs().sum() < 0.04


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def ckpt(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param)


def _generate(
    ckpt: Path, prompts: list[list[int]], params: list[SamplingParams], **cfg: object
) -> tuple[list[list[int]], LLMEngine]:
    cfg = {"num_kv_blocks": 48, **cfg}
    engine = LLMEngine(ckpt, EngineConfig(block_size=4, max_num_seqs=8, **cfg))  # type: ignore[arg-type]
    first = engine.generate(prompts, params)
    again = engine.generate(prompts, params)  # prefix-cache hits on blocks written under speculation
    if all(p.temperature == 0 or p.seed is not None for p in params):
        assert again == first
    return first, engine


# Decode graphs (eager on CPU, with the same padding and device-resident block tables) replay the
# steps without drafts and, a row per token, the verify steps, on block tables a rollback never shrinks.
@pytest.mark.parametrize("graphs", [False, True], ids=["plain", "graphs"])
def test_greedy_outputs_equal_decoding_without_speculation(ckpt: Path, graphs: bool) -> None:
    vocab_prompts = [
        [3, 4, 5, 6, 3, 4, 5, 6, 3, 4],  # repeats: lookups accept
        [7, 8, 9, 10, 11, 12, 13],
        [20, 21, 20, 21, 20],
        [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41],
    ]
    greedy = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=20, temperature=0.8, seed=7, ignore_eos=True)
    params = [greedy, greedy, sampled, greedy]  # a sampled request never speculates, same batch
    base, _ = _generate(ckpt, vocab_prompts, params, cuda_graphs=graphs)
    spec, engine = _generate(
        ckpt, vocab_prompts, params, cuda_graphs=graphs, speculative="ngram", num_speculative_tokens=3
    )
    assert spec == base
    assert engine.speculator is not None
    assert (engine.speculator.graph_verifies > 10) == graphs, engine.speculator.graph_verifies
    stats = engine.stats()
    assert stats.spec_proposed_tokens_total > 0
    # some drafts accepted and some rejected: the KV rollback ran
    assert 0 < stats.spec_accepted_tokens_total < stats.spec_proposed_tokens_total
    assert engine.block_manager.num_used_blocks == 0


def test_sampled_requests_speculate_and_finish(ckpt: Path) -> None:
    prompts = [[3, 4, 5, 6, 3, 4, 5, 6, 3, 4], [20, 21, 20, 21, 20]]
    p = SamplingParams(max_tokens=24, temperature=0.3, top_k=5, ignore_eos=True)
    got, engine = _generate(ckpt, prompts, [p, p], speculative="ngram", num_speculative_tokens=3)
    assert [len(g) for g in got] == [24, 24]
    assert engine.stats().spec_accepted_tokens_total > 0  # a low temperature keeps most repeats


def test_speculation_respects_max_tokens_and_stop_tokens(ckpt: Path) -> None:
    prompt = [3, 4, 5, 6, 3, 4, 5, 6, 3, 4]
    base, _ = _generate(ckpt, [prompt], [SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)])
    stop = base[0][12]
    for p in (
        SamplingParams(max_tokens=5, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop_token_ids=(stop,)),
    ):
        want, _ = _generate(ckpt, [prompt], [p])
        got, _ = _generate(ckpt, [prompt], [p], speculative="ngram", num_speculative_tokens=4)
        assert got == want
        assert len(got[0]) <= p.max_tokens


def test_bad_speculative_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="ngram, draft or eagle"):
        EngineConfig(speculative="medusa").validate()
    with pytest.raises(ValueError, match="at least 1"):
        EngineConfig(speculative="ngram", num_speculative_tokens=0).validate()
    with pytest.raises(ValueError, match="pipeline"):
        EngineConfig(speculative="ngram", pipeline_parallel_size=2).validate()


def test_serve_refuses_speculation_with_parallelism(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from kiln_engine.cli import main

    out = CliRunner().invoke(main, ["serve", "--model", str(tmp_path), "--speculative", "ngram", "--tp", "2"])
    assert out.exit_code == 2 and "one rank only" in out.output
    out = CliRunner().invoke(main, ["serve", "--model", str(tmp_path), "--speculative", "draft"])
    assert out.exit_code == 2 and "--draft-model" in out.output


def test_metrics_export_proposed_and_accepted_tokens() -> None:
    from kiln_engine.interface import EngineStats
    from kiln_engine.server.metrics import ServerMetrics

    m = ServerMetrics("m")
    first = EngineStats(spec_proposed_tokens_total=10, spec_accepted_tokens_total=4, spec_drafts_total=3)
    m.observe_stats(replace(first, spec_accepted_per_position=(3, 1)))
    later = EngineStats(spec_proposed_tokens_total=25, spec_accepted_tokens_total=9, spec_drafts_total=7)
    m.observe_stats(replace(later, spec_accepted_per_position=(5, 3, 1)))
    text = m.render().decode()
    assert 'kiln_engine_spec_decode_proposed_tokens_total{model="m"} 25.0' in text
    assert 'kiln_engine_spec_decode_accepted_tokens_total{model="m"} 9.0' in text
    assert 'kiln_engine_spec_decode_drafts_total{model="m"} 7.0' in text
    name = "kiln_engine_spec_decode_accepted_per_position_total"
    for position, count in (("1", 5), ("2", 3), ("3", 1)):
        assert f'{name}{{model="m",position="{position}"}} {count}.0' in text


def test_acceptance_counts_add_up(ckpt: Path) -> None:
    """Every verified draft run is counted once, its kept drafts by position: position i counts the
    runs that kept at least i drafts, so the positions sum to the accepted tokens and never grow."""
    prompts = [[3, 4, 5, 6, 3, 4, 5, 6, 3, 4], [20, 21, 20, 21, 20]]
    greedy = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    _, engine = _generate(ckpt, prompts, [greedy, greedy], speculative="ngram", num_speculative_tokens=3)
    stats = engine.stats()
    per_position = stats.spec_accepted_per_position
    assert len(per_position) == 3 and sum(per_position) == stats.spec_accepted_tokens_total > 0
    assert stats.spec_drafts_total >= per_position[0] >= per_position[1] >= per_position[2]
    assert stats.spec_drafts_total * 3 >= stats.spec_proposed_tokens_total > stats.spec_drafts_total


def _draft_with_another_tokenizer(ckpt: Path, out: Path) -> Path:
    """`ckpt` copied, two vocabulary entries swapped: same sizes, other text."""
    import shutil

    shutil.copytree(ckpt, out)
    tok = json.loads((out / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = [name for name in vocab if name.isalpha()][:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (out / "tokenizer.json").write_text(json.dumps(tok))
    return out


def test_greedy_outputs_equal_decoding_without_a_draft_model(ckpt: Path, tmp_path: Path) -> None:
    prompts = [[3, 4, 5, 6, 3, 4, 5, 6, 3, 4], [7, 8, 9, 10, 11, 12, 13], [30, 31, 32, 33, 34, 35, 36]]
    greedy = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=20, temperature=0.8, top_k=5, ignore_eos=True)
    base, _ = _generate(ckpt, prompts, [greedy] * 3)
    # The target as its own draft: every draft is the target's own greedy token, so all are kept
    # (up to ties the draft engine's batch shapes break otherwise).
    same, engine = _generate(ckpt, prompts, [greedy] * 3, speculative="draft", draft_model=str(ckpt),
                             num_speculative_tokens=3)  # fmt: skip
    assert same == base
    stats = engine.stats()
    assert stats.spec_proposed_tokens_total > 0
    assert stats.spec_accepted_tokens_total >= 0.9 * stats.spec_proposed_tokens_total
    # The draft engine reads each context's KV back from its prefix cache rather than recomputing it.
    assert engine.draft is not None and engine.draft.engine.stats().prefix_cache_hit_tokens_total > 0
    # A different model (other weights, one layer) with the same tokenizer: drafts are rejected
    # too, the KV rolls back, and greedy outputs still equal the target's alone.
    arch = json.loads((ckpt / "config.json").read_text())["model_type"]
    other = make_tiny_checkpoint(tmp_path / "draft", arch, seed=5, num_hidden_layers=1)
    got, engine = _generate(ckpt, prompts, [greedy, greedy, sampled], speculative="draft",
                            draft_model=str(other), num_speculative_tokens=4)  # fmt: skip
    assert got[:2] == base[:2] and len(got[2]) == 20
    stats = engine.stats()
    assert stats.spec_accepted_tokens_total < stats.spec_proposed_tokens_total
    assert engine.block_manager.num_used_blocks == 0


def test_a_draft_model_with_another_tokenizer_is_refused(ckpt: Path, tmp_path: Path) -> None:
    bad = _draft_with_another_tokenizer(ckpt, tmp_path / "bad")
    with pytest.raises(ValueError, match="tokenizer differs"):
        LLMEngine(
            ckpt, EngineConfig(num_kv_blocks=16, block_size=4, speculative="draft", draft_model=str(bad))
        )
    with pytest.raises(ValueError, match="draft_model"):
        EngineConfig(speculative="draft").validate()
    with pytest.raises(ValueError, match="draft_model"):
        EngineConfig(speculative="ngram", draft_model=str(ckpt)).validate()


@pytest.mark.parametrize("graphs", [False, True], ids=["plain", "graphs"])
def test_greedy_requests_under_a_grammar_speculate_and_equal_decoding_without_it(
    tmp_path: Path, graphs: bool
) -> None:
    """A JSON schema's fixed keys repeat, so n-gram drafts are proposed and accepted; every verify row
    is masked by the grammar after the drafts before it, so the greedy outputs equal constrained
    decoding without speculation, and every output, a sampled one's too, stays valid."""
    pytest.importorskip("xgrammar")
    ckpt = make_tiny_checkpoint(tmp_path / "tiny", "llama", seed=3)
    name = {"type": "string", "maxLength": 6}
    user_id = {"type": "integer", "minimum": 0, "maximum": 999}
    item = {"type": "object", "properties": {"name": name, "id": user_id}, "required": ["name", "id"]}
    schema = json.dumps({"type": "array", "items": item, "minItems": 3, "maxItems": 3})
    structured = ("json_schema", schema)
    greedy = SamplingParams(max_tokens=300, temperature=0, structured=structured)
    sampled = SamplingParams(max_tokens=300, temperature=1.0, structured=structured)
    params = [greedy, greedy, sampled]
    cfg = dict(num_kv_blocks=256, max_model_len=512, cuda_graphs=graphs)
    engine = LLMEngine(ckpt, EngineConfig(block_size=4, max_num_seqs=8, **cfg))  # type: ignore[arg-type]
    assert engine.tokenizer is not None
    prompts = [engine.tokenizer.encode(t) for t in ("List three users", "Users?", "Three users please")]
    base = engine.generate(prompts, params)
    spec, spec_engine = _generate(ckpt, prompts, params, speculative="ngram", num_speculative_tokens=4, **cfg)
    assert spec[:2] == base[:2]
    for tokens in spec:
        users = json.loads(engine.tokenizer.decode(tokens))
        assert len(users) == 3 and all(set(u) == {"name", "id"} for u in users), users
    stats = spec_engine.stats()
    assert 0 < stats.spec_accepted_tokens_total <= stats.spec_proposed_tokens_total
    assert spec_engine.speculator is not None
    assert (spec_engine.speculator.graph_verifies > 0) == graphs
    for tokens in spec_engine.generate(prompts, [sampled] * 3):  # sampled alone: they speculate too
        assert len(json.loads(engine.tokenizer.decode(tokens))) == 3
    assert spec_engine.stats().spec_proposed_tokens_total > stats.spec_proposed_tokens_total
