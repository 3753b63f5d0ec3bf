"""EAGLE heads: the drafts a head makes in the engine equal a reference head's (transformers' Llama
layer over transformers' hidden states, recomputed from scratch every time), greedy outputs with a
head equal outputs without one, and heads that do not fit are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kiln_engine.config import EngineConfig
from kiln_engine.engine import LLMEngine
from kiln_engine.interface import SamplingParams
from kiln_engine.sequence import Sequence
from kiln_engine.testing import make_tiny_checkpoint, make_tiny_eagle3_head, make_tiny_eagle_head

PROMPTS = [
    [3, 4, 5, 6, 3, 4, 5, 6, 3, 4],
    [7, 8, 9, 10, 11, 12, 13],
    [20, 21, 20, 21, 20],
    [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41],
]


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def ckpt(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def head(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_eagle_head(tmp_path_factory.mktemp("head"), ckpt, seed=3)


def _engine(ckpt: Path, **cfg: object) -> LLMEngine:
    cfg = {"num_kv_blocks": 64, "block_size": 4, "max_num_seqs": 8, **cfg}
    return LLMEngine(ckpt, EngineConfig(**cfg))  # type: ignore[arg-type]


class ReferenceHead:
    """The head as EAGLE's own code runs it, without a cache: transformers' one-layer Llama (input
    norm and final norm off) over fc(cat(embed(next token), feature)), every position recomputed."""

    def __init__(self, ckpt: Path, head: Path) -> None:
        from transformers import AutoModelForCausalLM, LlamaConfig, LlamaModel

        self.target = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
        weights = load_file(str(head / "model.safetensors"))
        self.fc = weights["fc.weight"]
        self.layer = LlamaModel(LlamaConfig.from_pretrained(head)).eval()
        self.layer.layers[0].input_layernorm = torch.nn.Identity()
        self.layer.norm = torch.nn.Identity()
        state = {n: t for n, t in weights.items() if n.startswith("layers.")}
        missing, unexpected = self.layer.load_state_dict(state, strict=False)
        assert not unexpected and set(missing) == {"embed_tokens.weight"}, (missing, unexpected)

    @torch.inference_mode()
    def drafts(self, context: list[int], k: int) -> list[int]:
        """k greedy drafts after `context` (its last token has no feature yet)."""
        ids = torch.tensor([context])
        features = self.target.model(ids[:, :-1]).last_hidden_state[0]  # post-norm, positions 0..e-1
        embed = self.target.model.embed_tokens
        inputs = torch.cat([embed(ids[0, 1:]), features], dim=-1) @ self.fc.T
        out: list[int] = []
        for _ in range(k):
            hidden = self.layer(inputs_embeds=inputs[None]).last_hidden_state[0, -1]
            token = int(self.target.lm_head(hidden).argmax())
            out.append(token)
            step = torch.cat([embed(torch.tensor([token]))[0], hidden]) @ self.fc.T
            inputs = torch.cat([inputs, step[None]])
        return out


def _record_drafts(engine: LLMEngine) -> list[tuple[list[int], int, list[int]]]:
    """Every drafting call's (real context, k, drafts), recorded around the engine's head."""
    spec = engine.speculator
    assert spec is not None and spec.late_proposer is not None
    proposer = spec.late_proposer
    calls: list[tuple[list[int], int, list[int]]] = []

    def recording(wanted: list[tuple[Sequence, int]]) -> list[list[int]]:
        contexts = [list(seq.token_ids[: len(seq.token_ids) - k]) for seq, k in wanted]
        drafts = proposer(wanted)
        calls.extend((c, k, d) for c, (_, k), d in zip(contexts, wanted, drafts, strict=True))
        return drafts

    spec.late_proposer = recording
    return calls


@pytest.mark.parametrize("graphs", [False, True], ids=["plain", "graphs"])
def test_drafts_equal_a_reference_head_and_greedy_outputs_equal_decoding_without_one(
    ckpt: Path, head: Path, graphs: bool
) -> None:
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    logprobs = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=1)  # never speculates
    params = [greedy, greedy, logprobs, greedy]
    base = _engine(ckpt, cuda_graphs=graphs).generate(PROMPTS, params)
    engine = _engine(
        ckpt, cuda_graphs=graphs, speculative="eagle", draft_model=str(head), num_speculative_tokens=3
    )
    calls = _record_drafts(engine)
    got = engine.generate(PROMPTS, params)
    assert got == base
    again = engine.generate(PROMPTS, params)  # prefix-cache hits: the head reads K/V written before
    assert again == base
    stats = engine.stats()
    assert stats.spec_proposed_tokens_total > 0 and len(calls) > 10
    # Near max_tokens sequences want fewer drafts: the draft steps' graph runs them as rows whose
    # extra steps write to the scratch block.
    assert {k for _, k, _ in calls} > {3}, {k for _, k, _ in calls}
    assert engine.block_manager.num_used_blocks == 0
    assert engine.runner.hidden_sink is not None and not engine.runner.hidden_sink.features  # type: ignore[attr-defined]
    # The first round's drafts (no prefix cache yet) are the reference head's, token for token.
    reference = ReferenceHead(ckpt, head)
    first_round = calls[: len(calls) // 2]
    mismatches = [(c, k, d) for c, k, d in first_round if reference.drafts(c, k) != d]
    assert not mismatches, mismatches[:3]


def test_a_head_that_drafts_the_targets_tokens_is_accepted(ckpt: Path, head: Path) -> None:
    """A head whose drafts are the target's own next tokens (the engine's drafts replaced by the
    reference decoding's) keeps them all: verification and rollback accept what they should."""
    greedy = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    want = _engine(ckpt).generate(PROMPTS, [greedy] * len(PROMPTS))
    engine = _engine(ckpt, speculative="eagle", draft_model=str(head), num_speculative_tokens=4)
    spec = engine.speculator
    assert spec is not None and spec.late_proposer is not None
    proposer = spec.late_proposer

    def oracle(wanted: list[tuple[Sequence, int]]) -> list[list[int]]:
        proposer(wanted)  # the head still runs: its caches advance as they would
        out = []
        for seq, k in wanted:
            i = next(i for i, p in enumerate(PROMPTS) if seq.token_ids[: len(p)] == p)
            done = len(seq.token_ids) - k - len(PROMPTS[i])  # tokens emitted so far
            out.append(want[i][done : done + k])
        return out

    spec.late_proposer = oracle
    assert engine.generate(PROMPTS, [greedy] * len(PROMPTS)) == want
    stats = engine.stats()
    assert stats.spec_accepted_tokens_total >= 0.8 * stats.spec_proposed_tokens_total


def test_sampled_requests_speculate_with_a_head(ckpt: Path, head: Path) -> None:
    p = SamplingParams(max_tokens=16, temperature=0.7, top_k=8, ignore_eos=True)
    engine = _engine(ckpt, speculative="eagle", draft_model=str(head), num_speculative_tokens=2)
    got = engine.generate(PROMPTS[:2], [p, p])
    assert [len(g) for g in got] == [16, 16]
    assert engine.stats().spec_proposed_tokens_total > 0


def test_heads_that_do_not_fit_are_refused(ckpt: Path, head: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="2-layer"):
        _engine(ckpt, speculative="eagle", draft_model=str(ckpt))
    one_layer = make_tiny_checkpoint(tmp_path / "one", "llama", num_hidden_layers=1)
    with pytest.raises(ValueError, match=r"no fc\.weight"):  # a one-layer model is not a head either
        _engine(ckpt, speculative="eagle", draft_model=str(one_layer))
    wide = make_tiny_checkpoint(
        tmp_path / "wide", "llama", hidden_size=32, num_attention_heads=2, num_key_value_heads=1
    )
    with pytest.raises(ValueError, match="hidden size 32"):
        _engine(ckpt, speculative="eagle", draft_model=str(make_tiny_eagle_head(tmp_path / "h32", wide)))
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "config.json").write_text((head / "config.json").read_text())
    weights = load_file(str(head / "model.safetensors"))
    save_file(
        {**weights, "layers.1.mlp.down_proj.weight": weights["layers.0.mlp.down_proj.weight"].clone()},
        str(extra / "model.safetensors"),
    )
    with pytest.raises(ValueError, match="does not belong to an EAGLE head"):
        _engine(ckpt, speculative="eagle", draft_model=str(extra))
    two = json.loads((head / "config.json").read_text()) | {"num_hidden_layers": 2}
    (extra / "config.json").write_text(json.dumps(two))
    with pytest.raises(ValueError, match="one LlamaForCausalLM decoder layer"):
        _engine(ckpt, speculative="eagle", draft_model=str(extra))
    with pytest.raises(ValueError, match="draft_model"):
        EngineConfig(speculative="eagle").validate()


def test_the_trained_tiny_chat_head_drafts_what_tiny_chat_says() -> None:
    """examples/tiny-chat-eagle, trained on tiny-chat's corpus: on its questions at least half of
    the drafts are kept (a bound fixed before the head was trained), and answers are tiny-chat's own."""
    examples = Path(__file__).resolve().parents[2] / "examples"
    chat, head = examples / "tiny-chat", examples / "tiny-chat-eagle"
    questions = ["What is Kiln?", "What does Kiln build?", "How does Kiln scale?", "Say hello."]
    greedy = SamplingParams(max_tokens=32, temperature=0, ignore_eos=False)
    plain = LLMEngine(chat, EngineConfig(device="cpu", max_model_len=512))
    assert plain.tokenizer is not None
    prompts = [plain.tokenizer.encode(f"<|bos|><|user|>\n{q}<|end|>\n<|assistant|>\n") for q in questions]
    want = plain.generate(prompts, greedy)
    engine = LLMEngine(
        chat, EngineConfig(device="cpu", max_model_len=512, speculative="eagle", draft_model=str(head))
    )
    assert engine.generate(prompts, greedy) == want
    stats = engine.stats()
    assert stats.spec_accepted_tokens_total >= 0.5 * stats.spec_proposed_tokens_total > 0, stats


class ReferenceEagle3:
    """An EAGLE-3 head as its paper and vLLM define it, in plain torch without a cache: fc over the
    model's states entering layers (2, L // 2, L - 3) (transformers' hidden_states[i] enters layer
    i), attention over (normed embedding, normed state) side by side with transformers' RoPE, a
    final norm, its own LM head and d2t; every position recomputed for every draft."""

    def __init__(self, ckpt: Path, head: Path) -> None:
        from transformers import AutoModelForCausalLM, LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self.target = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
        self.w = load_file(str(head / "model.safetensors"))
        self.config = LlamaConfig.from_pretrained(head)
        self.rotary = LlamaRotaryEmbedding(self.config)
        layers = self.target.config.num_hidden_layers
        self.aux = (2, layers // 2, layers - 3)

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.config.rms_norm_eps) * self.w[name]

    def _layer(self, embeds: torch.Tensor, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        w, c = self.w, self.config
        x = torch.cat([self._norm(embeds, "midlayer.input_layernorm.weight"),
                       self._norm(states, "midlayer.hidden_norm.weight")], dim=-1)  # fmt: skip
        n, d = x.shape[0], c.head_dim
        q, k, v = (
            (x @ w[f"midlayer.self_attn.{p}_proj.weight"].T).view(n, -1, d).transpose(0, 1) for p in "qkv"
        )
        cos, sin = self.rotary(x, torch.arange(n)[None])
        q, k = apply_rotary_pos_emb(q[None], k[None], cos, sin)
        groups = c.num_attention_heads // c.num_key_value_heads
        k, v = k[0].repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
        attn = torch.nn.functional.scaled_dot_product_attention(q[0], k, v, is_causal=True)
        h = attn.transpose(0, 1).reshape(n, -1) @ w["midlayer.self_attn.o_proj.weight"].T + states
        m = self._norm(h, "midlayer.post_attention_layernorm.weight")
        mlp = torch.nn.functional.silu(m @ w["midlayer.mlp.gate_proj.weight"].T) * (
            m @ w["midlayer.mlp.up_proj.weight"].T
        )
        prenorm = mlp @ w["midlayer.mlp.down_proj.weight"].T + h
        return self._norm(prenorm, "norm.weight"), prenorm

    @torch.inference_mode()
    def drafts(self, context: list[int], k: int) -> list[int]:
        ids = torch.tensor([context])
        hidden = self.target.model(ids[:, :-1], output_hidden_states=True).hidden_states
        states = torch.cat([hidden[i][0] for i in self.aux], dim=-1) @ self.w["fc.weight"].T
        tokens = list(context[1:])
        out: list[int] = []
        for _ in range(k):
            normed, prenorm = self._layer(self.target.model.embed_tokens(torch.tensor(tokens)), states)
            draft = int((normed[-1] @ self.w["lm_head.weight"].T).argmax())
            token = draft + int(self.w["d2t"][draft])
            out.append(token)
            tokens.append(token)
            states = torch.cat([states, prenorm[-1:]])
        return out


@pytest.fixture(scope="module")
def deep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An 8-layer Llama: EAGLE-3 reads the states entering its layers 2, 4 and 5."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("deep"), "llama", num_hidden_layers=8)


@pytest.mark.parametrize("graphs", [False, True], ids=["plain", "graphs"])
def test_eagle3_drafts_equal_a_reference_head_and_greedy_outputs_equal_decoding_without_one(
    deep: Path, tmp_path: Path, graphs: bool
) -> None:
    head = make_tiny_eagle3_head(tmp_path / "head3", deep, seed=4)
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    params = [greedy] * len(PROMPTS)
    base = _engine(deep, cuda_graphs=graphs).generate(PROMPTS, params)
    engine = _engine(
        deep, cuda_graphs=graphs, speculative="eagle", draft_model=str(head), num_speculative_tokens=3
    )
    calls = _record_drafts(engine)
    assert engine.generate(PROMPTS, params) == base
    assert engine.stats().spec_proposed_tokens_total > 0 and len(calls) > 10
    reference = ReferenceEagle3(deep, head)
    mismatches = [(c, k, d) for c, k, d in calls if reference.drafts(c, k) != d]
    assert not mismatches, mismatches[:3]
    vocab = set((int(d) + i for i, d in enumerate(load_file(str(head / "model.safetensors"))["d2t"])))
    assert {t for _, _, d in calls for t in d} <= vocab  # drafts come from the head's vocabulary


def test_an_eagle3_head_needs_a_deep_enough_model(ckpt: Path, tmp_path: Path) -> None:
    shallow = make_tiny_checkpoint(tmp_path / "shallow", "llama", num_hidden_layers=2)
    with pytest.raises(ValueError, match="at least 3 layers"):
        _engine(shallow, speculative="eagle", draft_model=str(make_tiny_eagle3_head(tmp_path / "h", shallow)))


def test_a_prefix_hit_recomputes_its_last_block_for_the_head(ckpt: Path, head: Path) -> None:
    """Two prompts share two whole blocks and differ right after them: the head's K/V at the second
    block's last position was written with the first prompt's next token, so the second request
    computes that block again (and only that one) and drafts what the reference head drafts."""
    shared = [3, 4, 5, 6, 7, 8, 9, 10]  # two blocks of 4
    first, second = [*shared, 11, 12, 13], [*shared, 40, 41, 42]
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    engine = _engine(ckpt, speculative="eagle", draft_model=str(head), num_speculative_tokens=3)
    engine.generate([first], greedy)
    calls = _record_drafts(engine)
    engine.generate([second], greedy)
    assert engine.stats().prefix_cache_hit_tokens_total == 4  # the first block only
    reference = ReferenceHead(ckpt, head)
    mismatches = [(c, k, d) for c, k, d in calls if reference.drafts(c, k) != d]
    assert calls and not mismatches, mismatches[:3]


def _homogeneity_p_value(a: list[tuple[int, ...]], b: list[tuple[int, ...]]) -> float:
    """Chi-square test that two samples come from one distribution; outcomes expected fewer than 5
    times in either sample share one bin."""
    from collections import Counter

    ca, cb = Counter(a), Counter(b)
    na, nb = len(a), len(b)
    bins: list[tuple[int, int]] = []
    rare = [0, 0]
    for outcome in set(ca) | set(cb):
        pair = (ca[outcome], cb[outcome])
        if min(sum(pair) * na, sum(pair) * nb) / (na + nb) < 5:
            rare = [rare[0] + pair[0], rare[1] + pair[1]]
        else:
            bins.append(pair)
    if sum(rare):
        bins.append((rare[0], rare[1]))
    stat = 0.0
    for x, y in bins:
        total = x + y
        for observed, n in ((x, na), (y, nb)):
            expected = total * n / (na + nb)
            stat += (observed - expected) ** 2 / expected
    df = len(bins) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2), torch.tensor(stat / 2)))


def test_sampled_answers_keep_the_models_distribution_with_a_head() -> None:
    """Rejection sampling keeps the model's distribution under a head's drafts: tiny-chat's 4-token
    answers sampled 1,200 times with its trained head and 1,200 times without come from one
    distribution (chi-square test of homogeneity; the test fails at p < 0.001, a bound fixed
    before the first run), while most drafts are kept."""
    examples = Path(__file__).resolve().parents[2] / "examples"
    params = SamplingParams(max_tokens=4, temperature=2.0, top_k=4, ignore_eos=True)  # flat enough
    samples = {}
    for method in (None, "eagle"):
        draft = str(examples / "tiny-chat-eagle") if method else None
        cfg = EngineConfig(
            device="cpu", max_model_len=128, max_num_seqs=64, speculative=method, draft_model=draft
        )
        engine = LLMEngine(examples / "tiny-chat", cfg)
        assert engine.tokenizer is not None
        prompt = engine.tokenizer.encode("<|bos|><|user|>\nWhat is Kiln?<|end|>\n<|assistant|>\n")
        samples[method] = [tuple(t) for t in engine.generate([prompt] * 1200, params)]
    stats = engine.stats()
    assert stats.spec_accepted_tokens_total > 0.5 * stats.spec_proposed_tokens_total > 0
    assert len(set(samples[None])) > 5  # a distribution, not one answer
    assert _homogeneity_p_value(samples[None], samples["eagle"]) > 1e-3
