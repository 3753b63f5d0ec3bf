"""EAGLE draft heads for speculative decoding: one decoder layer over the target's own hidden states
proposes each speculating sequence's next tokens; kiln_engine.speculative verifies them.

A head (EAGLE-1/2 format, as `yuhuili/EAGLE-LLaMA3-Instruct-8B` ships it: config.json of a one-layer
Llama, `fc.weight` [hidden, 2 * hidden], `layers.0.*` without an input norm) maps the target's final
normed hidden state f_p at position p and the embedding of the token after it, t_{p+1}, to a guess
of f_{p+1}: `layer(fc(cat(embed(t_{p+1}), f_p)))`. The target's LM head turns that guess into a draft
token, and the guess itself is the head's input for the draft after it. The target's `embed_tokens`
and `lm_head` serve the head (a head's own copy of the embedding is not loaded). An EAGLE-3 head
(`Eagle3Head`) reads three of the target's states instead (the residual streams entering a low, the
middle and a high layer) and drafts from its own LM head over a smaller vocabulary.

The head has a KV cache of its own, one layer deep, indexed by the target's blocks: its K/V of
position p sit in the slot the target's K/V of p use, so it needs no allocator and preemption,
rollback and freeing follow the target's. The target hands over the hidden states of every token
each forward pass computes (`observe`, from eager steps, decode graphs and verify steps alike); they
wait per request until the head's next drafting, which first runs the head over them ("catch-up":
the positions whose next token is now known) and then drafts one token per head step. Catch-up
writes the K/V of real features over whatever drafting left at those positions, so the head attends
only to K/V computed from the target's real features. Positions the target takes from its prefix
cache keep the head K/V the sequence that computed them wrote; a hit leaves its last block to
compute again (`BlockManager.recompute_last_hit`), since the head's K/V at a block's last position
depends on the token after it. (A block computed by a request that never speculates, one with
logprobs or a seed, holds no head K/V: drafts after such a hit are worse, never wrong.) Drafts are
greedy (a point mass), so `accept_sampled` keeps a sampled request's distribution the target's.

Drafting needs the blocks the scheduler gives the drafts, so the head drafts after scheduling
(`SpeculativeDecoder`'s late proposer). Catch-up runs eagerly; the draft steps after the first run
as one CUDA graph (kiln_engine.eagle_steps).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kiln_engine.config import EngineConfig, ModelConfig
from kiln_engine.eagle_steps import DraftSteps
from kiln_engine.layers.attention import AttentionMetadata
from kiln_engine.layers.linear import QKVParallelLinear
from kiln_engine.layers.norm import RMSNorm
from kiln_engine.layers.parallel import TPGroup
from kiln_engine.layers.rotary import RotaryEmbedding
from kiln_engine.loader import iter_weights, load_model_config, resolve_dtype
from kiln_engine.model_runner import ModelRunner, cache_slots, capture_sizes, runner_device, use_fused_kernels
from kiln_engine.models.llama import LlamaDecoderLayer, load_into, packed_target
from kiln_engine.scheduler import ScheduledChunk
from kiln_engine.sequence import Sequence
from kiln_engine.speculative import speculates

HEAD_ARCHITECTURES = ("LlamaForCausalLM",)
EAGLE3_ARCHITECTURE = "LlamaForCausalLMEagle3"
HEAD_IGNORED = ("embed_tokens.weight", "t2d")  # the model's embedding serves; t2d is d2t's inverse


@dataclass(frozen=True)
class HeadConfig:
    """A head's config.json: its decoder layer's sizes, its kind and its LM head's vocabulary."""

    layer: ModelConfig
    eagle3: bool  # EAGLE-3: three of the model's layers' states in, its own (smaller) vocabulary out
    draft_vocab_size: int


def eagle3_aux_layers(num_layers: int) -> tuple[int, ...]:
    """The model layers whose incoming residual streams an EAGLE-3 head reads, as EAGLE-3 trains
    them: a low, the middle and a high one."""
    return (2, num_layers // 2, num_layers - 3)


def read_head_config(path: Path) -> HeadConfig:
    """The head's config.json, refused unless it describes a head this runtime runs."""
    config_file = path / "config.json"
    if not config_file.exists():
        raise ValueError(f"EAGLE head {path}: no config.json")
    raw = json.loads(config_file.read_text())
    eagle3 = raw.get("architectures") == [EAGLE3_ARCHITECTURE]
    if eagle3:
        raw = raw | {"architectures": ["LlamaForCausalLM"]}
    cfg = ModelConfig.from_dict(raw)
    if cfg.architecture not in HEAD_ARCHITECTURES or cfg.num_hidden_layers != 1:
        raise ValueError(
            f"EAGLE head {path}: config.json describes a {cfg.num_hidden_layers}-layer {cfg.architecture}; "
            f"an EAGLE head is one {' or '.join(HEAD_ARCHITECTURES)} decoder layer"
        )
    return HeadConfig(cfg, eagle3, int(raw.get("draft_vocab_size") or cfg.vocab_size))


def _raw_head_weights(path: Path) -> dict[str, torch.Tensor]:
    """Tensors by name (without a `model.` prefix) from safetensors or, as EAGLE's own heads ship,
    pytorch_model.bin, read with torch's tensors-only unpickler (no code runs)."""
    files = sorted(path.glob("*.safetensors"))
    if files:
        weights = dict(iter_weights(files))
    elif (path / "pytorch_model.bin").exists():
        weights = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"EAGLE head {path}: no *.safetensors or pytorch_model.bin")
    return {name.removeprefix("model."): t for name, t in weights.items()}


def is_eagle_head(path: Path) -> bool:
    """Whether the checkpoint at `path` is an EAGLE head (it has an `fc`) rather than a model; reads
    tensor names only, where safetensors allow it."""
    from safetensors import safe_open

    names: set[str] = set()
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            names.update(st.keys())
    if not names and (path / "pytorch_model.bin").exists():
        names = set(torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True))
    return bool({"fc.weight", "model.fc.weight"} & names)


def read_head_weights(path: Path) -> dict[str, torch.Tensor]:
    """The head's tensors by name (without a `model.` prefix)."""
    weights = _raw_head_weights(path)
    if "fc.weight" not in weights:
        raise ValueError(f"EAGLE head {path}: no fc.weight, so not an EAGLE head")
    return weights


def write_head(src: Path, dst: Path) -> None:
    """The head at `src` as an engine artifact carries it: config.json and one safetensors file."""
    from safetensors.torch import save_file

    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    weights = {n: t.contiguous() for n, t in read_head_weights(src).items()}
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})


def check_head(path: Path, target: ModelConfig) -> HeadConfig:
    """The head's config, once it is known to fit `target`: same hidden size and vocabulary, and
    for EAGLE-3 a model deep enough for its three layers."""
    head = read_head_config(path)
    cfg = head.layer
    if (cfg.hidden_size, cfg.vocab_size) != (target.hidden_size, target.vocab_size):
        raise ValueError(
            f"EAGLE head {path}: hidden size {cfg.hidden_size} and vocabulary {cfg.vocab_size}, "
            f"the model's are {target.hidden_size} and {target.vocab_size}"
        )
    if head.eagle3 and (target.num_hidden_layers < 3 or head.draft_vocab_size > target.vocab_size):
        raise ValueError(
            f"EAGLE-3 head {path}: needs a model of at least 3 layers ({target.num_hidden_layers}) and a "
            f"draft vocabulary within the model's ({head.draft_vocab_size} of {target.vocab_size})"
        )
    return head


class _Head(nn.Module):
    """What both head kinds share: an fc, one Llama decoder layer, loading by checkpoint names."""

    fc: nn.Linear
    layer: LlamaDecoderLayer

    def forward(
        self, embeds: torch.Tensor, features: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states the drafts are read from, hidden states the next draft step takes)."""
        raise NotImplementedError

    def draft_tokens(self, out: torch.Tensor, target: nn.Module) -> torch.Tensor:
        """The greedy draft token of each row of `out` (the first of `forward`'s results)."""
        raise NotImplementedError

    def _place(self, name: str) -> tuple[nn.Module, str, str | int | tuple[int, int] | None] | None:
        """(module, parameter, shard) checkpoint tensor `name` loads into; None: not this head's."""
        raise NotImplementedError

    def _layer_place(self, name: str) -> tuple[nn.Module, str, str | int | tuple[int, int] | None] | None:
        module_path, param, shard = packed_target(name)
        try:
            return self.layer.get_submodule(module_path), param, shard
        except AttributeError:
            return None

    def load_weights(self, weights: dict[str, torch.Tensor], optional: tuple[str, ...] = ()) -> None:
        """Load the head's tensors; fail on foreign or missing ones (`optional` may be missing)."""
        tensors = [*self.named_parameters(), *((n, b) for n, b in self.named_buffers() if n == "d2t")]
        names = {id(t): n for n, t in tensors}
        loaded: set[str] = set()
        for name, tensor in weights.items():
            if name in HEAD_IGNORED:
                continue
            place = self._place(name)
            if place is None:
                raise ValueError(f"tensor {name!r} does not belong to an EAGLE head")
            module, param, shard = place
            load_into(module, param, tensor, shard)
            loaded.add(names[id(getattr(module, param))])
        missing = sorted(set(names.values()) - loaded - set(optional))
        if missing:
            raise ValueError(f"EAGLE head is missing {len(missing)} tensors, e.g. {missing[:4]}")


class EagleHead(_Head):
    """EAGLE-1/2: fc over (token embedding, model's final hidden state), one decoder layer; its output
    is both the next hidden state's guess and, through the model's LM head, the draft."""

    def __init__(
        self, cfg: ModelConfig, max_positions: int, dtype: torch.dtype, fc_bias: bool, input_norm: bool
    ):
        super().__init__()
        h = cfg.hidden_size
        self.fc = nn.Linear(2 * h, h, bias=fc_bias, dtype=dtype)
        rotary = RotaryEmbedding(cfg.rope, cfg.rotary_dim, cfg.max_position_embeddings, max_positions)
        self.layer = LlamaDecoderLayer(cfg, 0, rotary, dtype, TPGroup())
        self.input_norm = input_norm  # EAGLE-1 heads have none: fc's output enters attention as is

    def forward(
        self, embeds: torch.Tensor, features: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.fc(torch.cat([embeds, features], dim=-1))
        h = self.layer.input_layernorm(x) if self.input_norm else x
        h = self.layer.self_attn(positions, h, meta)
        h, residual = self.layer.post_attention_layernorm.add_forward(h, x)
        out = self.layer.mlp(h) + residual
        return out, out

    def draft_tokens(self, out: torch.Tensor, target: nn.Module) -> torch.Tensor:
        return target.compute_logits(out).argmax(dim=-1)  # type: ignore[operator]

    def _place(self, name: str) -> tuple[nn.Module, str, str | int | tuple[int, int] | None] | None:
        if name.startswith("fc."):
            return self.fc, name.removeprefix("fc."), None
        if name.startswith("layers.0."):
            return self._layer_place(name.removeprefix("layers.0."))
        return None


class Eagle3Head(_Head):
    """EAGLE-3: fc over three of the model's layers' states (a low, the middle and a high layer's
    incoming residual streams, side by side), then one decoder layer whose attention reads the
    normed token embedding and normed state side by side; a final norm and its own LM head over a
    draft vocabulary that `d2t` maps into the model's (model id = draft id + d2t[draft id]). A draft
    step after the first takes the head's own pre-norm output as its state (no fc)."""

    def __init__(self, cfg: ModelConfig, max_positions: int, dtype: torch.dtype, draft_vocab_size: int):
        super().__init__()
        h = cfg.hidden_size
        self.fc = nn.Linear(3 * h, h, bias=False, dtype=dtype)
        rotary = RotaryEmbedding(cfg.rope, cfg.rotary_dim, cfg.max_position_embeddings, max_positions)
        self.layer = LlamaDecoderLayer(cfg, 0, rotary, dtype, TPGroup())
        heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.layer.self_attn.qkv_proj = QKVParallelLinear(
            2 * h, cfg.head_dim, heads, kv_heads, cfg.attention_bias, cfg.quant, dtype, TPGroup()
        )
        self.hidden_norm = RMSNorm(h, cfg.rms_norm_eps, dtype)
        self.norm = RMSNorm(h, cfg.rms_norm_eps, dtype)
        self.lm_head = nn.Linear(h, draft_vocab_size, bias=False, dtype=dtype)
        self.d2t: torch.Tensor
        self.register_buffer("d2t", torch.zeros(draft_vocab_size, dtype=torch.int64))

    def forward(
        self, embeds: torch.Tensor, features: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if features.shape[-1] != embeds.shape[-1]:  # the model's three states, not the head's own
            features = self.fc(features)
        x = torch.cat([self.layer.input_layernorm(embeds), self.hidden_norm(features)], dim=-1)
        h = self.layer.self_attn(positions, x, meta)
        h, residual = self.layer.post_attention_layernorm.add_forward(h, features)
        normed, prenorm = self.norm.add_forward(self.layer.mlp(h), residual)
        return normed, prenorm

    def draft_tokens(self, out: torch.Tensor, target: nn.Module) -> torch.Tensor:
        ids = self.lm_head(out).argmax(dim=-1)
        return ids + self.d2t[ids]

    def _place(self, name: str) -> tuple[nn.Module, str, str | int | tuple[int, int] | None] | None:
        if name.startswith("fc."):
            return self.fc, name.removeprefix("fc."), None
        if name == "midlayer.hidden_norm.weight":
            return self.hidden_norm, "weight", None
        if name.startswith("midlayer."):
            return self._layer_place(name.removeprefix("midlayer."))
        if name in ("norm.weight", "lm_head.weight"):
            module, _, param = name.partition(".")
            return getattr(self, module), param, None
        if name == "d2t":
            return self, "d2t", None
        return None


def load_head(
    path: Path, target: ModelConfig, max_positions: int, dtype: torch.dtype, device: torch.device
) -> _Head:
    head_config = check_head(path, target)
    cfg = head_config.layer
    weights = read_head_weights(path)
    optional: tuple[str, ...] = ()
    with torch.device(device):
        head: _Head
        if head_config.eagle3:
            head = Eagle3Head(cfg, max_positions, dtype, head_config.draft_vocab_size)
            if head_config.draft_vocab_size == target.vocab_size:
                optional = ("d2t",)  # the model's own vocabulary: no map
        else:
            head = EagleHead(
                cfg,
                max_positions,
                dtype,
                fc_bias="fc.bias" in weights,
                input_norm="layers.0.input_layernorm.weight" in weights,
            )
            if not head.input_norm:
                optional = ("layer.input_layernorm.weight",)
    with torch.no_grad():
        cast = {n: t.to(device, dtype) if t.is_floating_point() else t.to(device) for n, t in weights.items()}
        head.load_weights(cast, optional)
    return head.eval()


def prepare_head(model_path: str | Path, config: EngineConfig) -> tuple[_Head, int, tuple[int, ...]]:
    """The engine's head, loaded before the model sizes its KV cache; the bytes its K/V takes per
    cache block (the model counts them when it chooses its number of blocks); and the model layers
    whose incoming states the head reads (EAGLE-3; none: the final hidden states)."""
    if config.draft_model is None:
        raise ValueError("speculative decoding with an EAGLE head needs draft_model (the head's directory)")
    target = load_model_config(model_path)
    device = runner_device(config)
    dtype = resolve_dtype(config.dtype, device, target)
    max_positions = config.max_model_len or target.max_position_embeddings
    head = load_head(Path(config.draft_model), target, max_positions, dtype, device)
    attn = head.layer.self_attn.attn
    elem = torch.empty((), dtype=dtype).element_size()
    aux = eagle3_aux_layers(target.num_hidden_layers) if isinstance(head, Eagle3Head) else ()
    return head, 2 * config.block_size * attn.num_kv_heads * attn.head_dim * elem, aux


@dataclass
class _Features:
    """A request's target hidden states not yet run through the head: positions start, start+1, ..."""

    start: int
    rows: torch.Tensor = field(default_factory=lambda: torch.empty(0))

    @property
    def end(self) -> int:
        return self.start + self.rows.shape[0]


@dataclass
class _CatchUp:
    """A drafting call's inputs on the device: catch-up rows, then each sequence's drafts."""

    ids: torch.Tensor  # each catch-up position's next token
    positions: torch.Tensor
    meta: AttentionMetadata
    last: torch.Tensor  # each sequence's last catch-up row (its first draft's)
    ends: torch.Tensor  # each sequence's first draft position, padded for DraftSteps
    wanted: torch.Tensor  # drafts each sequence wants, padded with 0


class EagleProposer:
    """Keeps the target's hidden states per request and drafts with the head (a late proposer)."""

    def __init__(self, head: _Head, runner: ModelRunner, num_tokens: int) -> None:
        """`num_tokens`: the most drafts a sequence asks for at once."""
        self.runner = runner
        self.head = head.to(runner.dtype)  # an artifact's manifest may choose another dtype
        attn = self.head.layer.self_attn.attn
        attn.backend = runner.backend
        use_fused_kernels(self.head, runner.backend.name == "triton")
        shape = (runner.num_blocks + 1, runner.block_size, attn.num_kv_heads, attn.head_dim)
        self.kv_cache = torch.zeros(2, *shape, dtype=runner.dtype, device=runner.device)
        attn.k_cache, attn.v_cache = self.kv_cache[0], self.kv_cache[1]
        self.features: dict[str, _Features] = {}
        capture = runner.decode_graphs is not None and runner.device.type == "cuda"
        sizes = capture_sizes(runner.config.max_num_seqs)
        self.steps = DraftSteps(self.head, runner, sizes, num_tokens - 1, capture)

    # -- HiddenStateSink ---------------------------------------------------------------------------
    def observe(self, chunks: list[ScheduledChunk], hidden: torch.Tensor) -> None:
        offset = 0
        for c in chunks:
            if speculates(c.seq.params):
                self._keep(c.seq.request_id, c.start, hidden[offset : offset + c.num_tokens])
            offset += c.num_tokens

    def release(self, request_id: str) -> None:
        self.features.pop(request_id, None)

    def _keep(self, request_id: str, start: int, rows: torch.Tensor) -> None:
        """Add the features of positions [start, start + len(rows)). Rows at or past `start` that
        were kept before (drafts' rows of a verify step, a recomputation) give way; a start past the
        kept ones (positions from the prefix cache) or before them (a preempted sequence's
        recomputation) starts over."""
        f = self.features.get(request_id)
        if f is None or not f.start <= start <= f.end:
            self.features[request_id] = _Features(start, rows.clone())
            return
        f.rows = torch.cat([f.rows[: start - f.start], rows])

    # -- LateProposer ------------------------------------------------------------------------------
    @torch.inference_mode()
    def __call__(self, wanted: list[tuple[Sequence, int]]) -> list[list[int]]:
        """k greedy drafts for each (sequence holding k placeholders after its last real token, k)."""
        if not wanted:
            return []
        runner = self.runner
        seqs = [seq for seq, _ in wanted]
        spans = [self._catch_up_span(seq, k) for seq, k in wanted]
        ids: list[int] = []
        pieces: list[torch.Tensor] = []
        for seq, (start, end) in zip(seqs, spans, strict=True):
            ids.extend(seq.token_ids[start + 1 : end + 1])  # each position's next token
            kept = self.features[seq.request_id]
            pieces.append(kept.rows[: end - start])
            self.features[seq.request_id] = _Features(end, kept.rows[:0])  # the verify step adds its own
        rows = [(seq.block_table, start, end) for seq, (start, end) in zip(seqs, spans, strict=True)]
        step = self._stage(ids, rows, [k for _, k in wanted])
        runner.backend.prepare(step.meta)
        embeds = runner.model.model.embed_tokens(step.ids)
        out, state = self.head(embeds, torch.cat(pieces), step.positions, step.meta)
        first = self.head.draft_tokens(out.index_select(0, step.last), runner.model)
        # Drafts 2..k in one graph; they stay on the device until all are made (one read).
        drafts = self.steps.run(
            first, state.index_select(0, step.last), step.ends, step.wanted, step.meta.block_tables
        )
        return [row[:k] for row, (_, k) in zip(drafts.tolist(), wanted, strict=True)]

    def _catch_up_span(self, seq: Sequence, k: int) -> tuple[int, int]:
        """Positions [start, end) the head runs over before drafting: the kept features' positions
        up to the last real token's (end = its position, the context's computed length)."""
        end = seq.num_computed_tokens
        f = self.features.get(seq.request_id)
        if end != len(seq.token_ids) - k - 1 or f is None or not f.start < end <= f.end:
            raise RuntimeError(
                f"request {seq.request_id}: no target hidden states up to position {end - 1} for its head"
            )
        return f.start, end

    def _stage(self, ids: list[int], rows: list[tuple[list[int], int, int]], wanted: list[int]) -> _CatchUp:
        """A drafting call's inputs on the device, in one host-to-device copy (each copy through
        pinned memory costs tens of microseconds of host time, and drafting waits on the host):
        catch-up over `rows` (block table, first position, end position) of each sequence, whose
        input tokens are `ids`, then `wanted` drafts of each."""
        bs = self.runner.block_size
        positions = [p for _, start, end in rows for p in range(start, end)]
        slots = [s for table, start, end in rows for s in cache_slots(table, start, end, bs)]
        query_lens = [end - start for _, start, end in rows]
        query_start = [0, *itertools.accumulate(query_lens)]
        ends = [end for _, _, end in rows]
        pad = self.steps.padded(len(rows)) - len(rows)
        width = max(len(table) for table, _, _ in rows)
        tables = [b for table, _, _ in rows for b in table + [0] * (width - len(table))]
        parts = (ids, positions, slots, query_start, ends, query_lens, query_start[1:], ends + [0] * pad,
                 wanted + [0] * pad, tables)  # fmt: skip
        flat = self.runner._to_device([v for part in parts for v in part], torch.int64)
        (ids_d, pos_d, slots_d, qs_d, lens_d, qlens_d, last_d, ends_d, wanted_d, tables_d) = flat.split(
            [len(part) for part in parts]
        )
        i32 = torch.int32
        meta = AttentionMetadata(
            slot_mapping=slots_d,
            query_start_loc=qs_d.to(i32),
            seq_lens=lens_d.to(i32),
            query_lens=qlens_d.to(i32),
            block_tables=tables_d.view(len(rows), width).to(i32),
            max_query_len=max(query_lens),
            max_seq_len=max(ends),
            block_size=bs,
        )
        return _CatchUp(ids_d, pos_d, meta, last_d - 1, ends_d, wanted_d)
