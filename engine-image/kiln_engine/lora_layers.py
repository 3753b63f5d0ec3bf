"""The batched multi-LoRA forward: adapter slots stacked on each fused, sharded projection, and which
slot each token of a step uses.

Every targeted projection (`qkv_proj`, `o_proj`, `gate_up_proj`, `down_proj`) carries a `LoraLinear`
holding all slots at once: A as [slots * K, in] and B as [out, slots * K] (the [slots, K, in] and
[slots, out, K] stacks, laid out so that all slots are one matrix each), with K = sub-projections x
max rank. A fused projection's sub-projections (q, k, v; gate, up) each own K / n columns of B and
the matching rows of its own output channels, so one A and one B serve the fused layer; ranks below
the maximum leave zero rows and columns. Sharding follows the base layer: a column-parallel layer's
B is split like its output channels (k/v replicated as its heads are) and A is whole; a row-parallel
layer's A is split like its input and B is whole, its partial products joining the base layer's
partial sums before their all-reduce.

A step's tokens reach the layers through one shared `LoraBatch`, in one of two forms:
* segments (eager steps off a GPU): per slot in use, the rows of its tokens; each segment is two
  small GEMMs added into its rows, and rows of the base model cost nothing;
* each token's slot, -1 for the base model (decode graphs, where shapes and control flow are fixed,
  and eager steps on a GPU): on GPU, in graphs of up to KERNELS_UP_TO_TOKENS rows, two Triton
  kernels per projection (layers/lora_kernels.py) run each token through its own slot only; in
  larger graphs, eager GPU steps and off a GPU, x @ A of all slots, masked to each token's slot, @ B
  (the mask made once per step).

On an H100, per Llama-3-8B layer, segments cost 3.9-23x the masked form on 16 to 2,048 tokens
spread over 8 or 32 rank-16 slots (even replayed from a graph: an index_select and an index_add per
slot; bench/results-committed/lora_kernels-h100-run3-tiled.json), so eager GPU steps (prefill) take
the masked form, whose GEMMs grow with slots x rank instead. A single adapter on every token of a
step takes its own two GEMMs (`segments` with all rows) everywhere.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from kiln_engine.config import EngineConfig, ModelConfig
from kiln_engine.layers.linear import LinearBase, RowParallelLinear, load_slice
from kiln_engine.layers.lora_kernels import (
    KERNELS_UP_TO_TOKENS,
    add_lora_delta,
    add_masked_lora_delta,
    check_lora_kernels,
    masked_shrink,
    slot_mask,
)
from kiln_engine.lora import AdapterError, LoraAdapter, load_adapter
from kiln_engine.scheduler import ScheduledChunk

log = logging.getLogger(__name__)

# HF module -> (fused engine module under the decoder layer, its sub-projection key)
FUSED_TARGETS: dict[str, tuple[str, str | int | None]] = {
    "q_proj": ("self_attn.qkv_proj", "q"),
    "k_proj": ("self_attn.qkv_proj", "k"),
    "v_proj": ("self_attn.qkv_proj", "v"),
    "o_proj": ("self_attn.o_proj", None),
    "gate_proj": ("mlp.gate_up_proj", 0),
    "up_proj": ("mlp.gate_up_proj", 1),
    "down_proj": ("mlp.down_proj", None),
}
SUBS: dict[str, tuple[str | int | None, ...]] = {
    "self_attn.qkv_proj": ("q", "k", "v"),
    "self_attn.o_proj": (None,),
    "mlp.gate_up_proj": (0, 1),
    "mlp.down_proj": (None,),
}


@dataclass
class LoraBatch:
    """Which LoRA slot each token of the running step uses (shared by every `LoraLinear`)."""

    segments: list[tuple[int, torch.Tensor | None]] = field(default_factory=list)  # (slot, rows | all)
    slots: torch.Tensor | None = None  # [tokens] int32: each token's slot, -1 for the base model
    kernels: bool = False  # small graphs go through layers/lora_kernels.py (GPU, once checked)
    eager_masked: bool = False  # eager steps of several slots take the masked form (GPU)
    num_slots: int = 0
    dtype: torch.dtype = torch.float32  # the activations'
    # The masked form's [tokens, slots, 1] selector, made once per step rather than per projection
    # (7 projections a layer would otherwise build it 4 times each, a few kernels every time).
    mask: torch.Tensor | None = None
    # Where each projection's first half (x through A) runs beside the base GEMM (GPU; `LoraLinear.begin`).
    side_stream: torch.cuda.Stream | None = None

    def clear(self) -> None:
        self.segments, self.slots, self.mask = [], None, None

    def set_segments(self, token_slots: list[int], device: torch.device) -> None:
        """Eager steps: each token's slot (-1: base model, no LoRA)."""
        used = sorted(set(token_slots) - {-1})
        if len(used) == 1 and -1 not in token_slots:
            self.segments, self.slots, self.mask = [(used[0], None)], None, None
            return
        if self.eager_masked:
            slots = torch.tensor(token_slots, dtype=torch.int32).to(device, non_blocking=True)
            self.segments, self.slots, self.mask = [], slots, slot_mask(slots, self.num_slots, self.dtype)
            return
        rows: dict[int, list[int]] = {s: [] for s in used}
        for i, s in enumerate(token_slots):
            if s >= 0:
                rows[s].append(i)
        self.slots, self.mask = None, None
        self.segments = [(s, torch.tensor(rows[s], dtype=torch.int64, device=device)) for s in used]

    def uses_kernels(self, tokens: int) -> bool:
        """Whether a decode graph of `tokens` rows runs the kernels (else the masked form)."""
        return self.kernels and tokens <= KERNELS_UP_TO_TOKENS

    def set_slots(self, slots: torch.Tensor) -> None:
        self.segments, self.slots = [], slots
        kernels = self.uses_kernels(slots.shape[0])
        self.mask = None if kernels else slot_mask(slots, self.num_slots, self.dtype)


class LoraLinear:
    """All slots' A and B for one (fused) projection, and its LoRA delta for a batch."""

    def __init__(
        self,
        layer: LinearBase,
        subs: tuple[str | int | None, ...],
        num_slots: int,
        max_rank: int,
        batch: LoraBatch,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.layer = layer
        self.subs = subs
        self.max_rank = max_rank
        self.k = len(subs) * max_rank
        self.batch = batch
        self.num_slots = num_slots
        self.a = torch.zeros(num_slots * self.k, layer.in_features, dtype=dtype, device=device)
        self.b = torch.zeros(layer.out_features, num_slots * self.k, dtype=dtype, device=device)

    def load(self, slot: int, parts: dict[str | int | None, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put one adapter's (A, B) per sub-projection into `slot`; absent sub-projections get zeros."""
        cols = slice(slot * self.k, (slot + 1) * self.k)
        a, b = self.a[cols], self.b[:, cols]
        a.zero_()
        b.zero_()
        layer, tp = self.layer, self.layer.tp
        for j, sub in enumerate(self.subs):
            if sub not in parts:
                continue
            wa, wb = parts[sub]
            r = wa.shape[0]
            k0 = j * self.max_rank
            if isinstance(layer, RowParallelLinear):  # input split like the layer's, B whole
                load_slice(a[k0 : k0 + r], wa, 1, tp.rank, tp.size, "lora_A")
                load_slice(b[:, k0 : k0 + r], wb, None, 0, 1, "lora_B")
                continue
            shard_layout = getattr(layer, "shard_layout", None)
            if shard_layout is not None:  # merged: this sub-projection's rows of the fused output
                offset, size, index, count = shard_layout(sub)
            else:
                offset, size, index, count = 0, layer.out_features, tp.rank, tp.size
            load_slice(a[k0 : k0 + r], wa, None, 0, 1, "lora_A")
            load_slice(b[offset : offset + size, k0 : k0 + r], wb, 0, index, count, "lora_B")

    def begin(self, x: torch.Tensor) -> torch.Tensor | None:
        """Start the delta's first half (`x` through A) on the side stream, where it runs beside the
        base GEMM the layer launches next; None where the delta runs whole afterwards (no side stream,
        eager steps, the small graphs' kernels, per-adapter segments of rows). On an H100 per 8B
        layer at 64 tokens over 8 adapters the masked delta went from 46 to 31 us, but the kernels
        at 16-32 tokens from 35-42 to 44-54 us (lora_kernels-h100-run5-overlapped.json)."""
        batch, side, slots, k = self.batch, self.batch.side_stream, self.batch.slots, self.k
        whole_slot = self._whole_slot()
        if side is None or not torch.cuda.is_current_stream_capturing():
            return None  # eager steps: switching streams cost prefill more host time than it saved
        if whole_slot is None and (slots is None or batch.mask is None):
            return None  # per-adapter segments, or the kernels (small graphs: slower beside the GEMM)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            if whole_slot is not None:
                return x @ self.a[whole_slot * k : (whole_slot + 1) * k].t()
            assert batch.mask is not None
            return masked_shrink(x, self.a, batch.mask, k)

    def add_delta(
        self, x: torch.Tensor, out: torch.Tensor, begun: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`out` + this step's LoRA delta of `x` (in place; `out` is the base layer's fresh output),
        finishing what `begin` started if it returned `begun`."""
        batch, k, slots = self.batch, self.k, self.batch.slots
        if begun is not None:
            assert batch.side_stream is not None
            torch.cuda.current_stream(out.device).wait_stream(batch.side_stream)
            if slots is None:
                slot = self._whole_slot()
                assert slot is not None
                return out.addmm_(begun, self.b[:, slot * k : (slot + 1) * k].t())
            return out.addmm_(begun, self.b.t())
        if slots is not None:
            if batch.mask is None:
                return add_lora_delta(x, out, self.a, self.b, slots, k)
            return add_masked_lora_delta(x, out, self.a, self.b, batch.mask, k)
        for slot, rows in batch.segments:
            a, b = self.a[slot * k : (slot + 1) * k], self.b[:, slot * k : (slot + 1) * k]
            if rows is None:
                out.addmm_(x @ a.t(), b.t())
            else:
                out.index_add_(0, rows, (x.index_select(0, rows) @ a.t()) @ b.t())
        return out

    def _whole_slot(self) -> int | None:
        """The one slot every token of this step uses, where the step is a single whole segment."""
        segments = self.batch.segments
        return segments[0][0] if len(segments) == 1 and segments[0][1] is None else None


class LoraRuntime:
    """The adapters a model runner serves: validated on the host, loaded into GPU slots on demand."""

    def __init__(
        self,
        model: torch.nn.Module,
        model_config: ModelConfig,
        config: EngineConfig,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_slots = config.max_loras
        self.max_rank = config.max_lora_rank
        self.device = device
        self.batch = LoraBatch(num_slots=self.num_slots, dtype=dtype, eager_masked=device.type == "cuda")
        # The kernels serve decode graphs only.
        if device.type == "cuda" and config.cuda_graphs and config.lora_kernels:
            failed = check_lora_kernels(device, dtype)
            self.batch.kernels = failed is None
            if failed is not None:
                log.error("LoRA kernels failed their check, decode graphs use the masked form: %s", failed)
        if device.type == "cuda" and config.lora_side_stream:
            self.batch.side_stream = torch.cuda.Stream(device)
        self.layers: dict[tuple[int, str], LoraLinear] = {}
        for i, decoder in enumerate(getattr(model.model, "layers", [])):
            for path, subs in SUBS.items():
                try:
                    layer = decoder.get_submodule(path)
                except AttributeError:
                    continue  # another pipeline stage's layer, or a mixture of experts
                if isinstance(layer, LinearBase):
                    lora = LoraLinear(layer, subs, self.num_slots, self.max_rank, self.batch, dtype, device)
                    layer.lora = lora
                    self.layers[(i, path)] = lora
        self.model_config = model_config
        # The adapters served now, by name, and every loaded version by key ("name#n"): a request
        # runs the version its name meant when it arrived (`key_of`), so replacing or removing an
        # adapter never changes the weights under a request in flight.
        self.adapters: dict[str, LoraAdapter] = {}
        self.key_of: dict[str, str] = {}
        self.versions: dict[str, LoraAdapter] = {}
        self.versions_read = 0  # the next key's number (the same on every rank: same calls, same order)
        # Adapters that cannot be served, and why: the base model and the other adapters keep
        # serving, and a request for one of these is refused with the reason.
        self.failed: dict[str, str] = {}
        self.loaded: list[str | None] = [None] * self.num_slots
        self.loads_total = 0
        self.set_adapters(config.lora_modules, keep=set())

    def set_adapters(self, modules: list[tuple[str, str]], keep: set[str]) -> None:
        """Serve exactly `modules` (name, local directory) from now on. An adapter whose directory is
        unchanged stays as it is; a new or moved one is read and checked (a bad one lands in `failed`
        and the rest are served); versions no longer served are dropped unless `keep` names their key
        (requests in flight hold them)."""
        names = [name for name, _ in modules]
        if len(set(names)) != len(names):
            raise AdapterError(f"adapter names must be unique, got {names}")
        adapters: dict[str, LoraAdapter] = {}
        self.failed = {}
        for name, path in modules:
            old = self.adapters.get(name)
            if old is not None and old.path == path:
                adapters[name] = old
                continue
            try:
                adapter = self._checked(load_adapter(name, path, self.model_config, self.max_rank))
            except AdapterError as exc:
                log.error("not serving LoRA adapter %r: %s", name, exc)
                self.failed[name] = str(exc)
                continue
            self.versions_read += 1
            self.key_of[name] = f"{name}#{self.versions_read}"
            self.versions[self.key_of[name]] = adapters[name] = adapter
        self.adapters = adapters
        self.key_of = {name: key for name, key in self.key_of.items() if name in adapters}
        served = set(self.key_of.values()) | keep
        self.versions = {key: a for key, a in self.versions.items() if key in served}
        self.loaded = [key if key in self.versions else None for key in self.loaded]

    def _checked(self, adapter: LoraAdapter) -> LoraAdapter:
        """`adapter`, once every projection it targets is one of this model's dense projections."""
        for layer_i, module in adapter.weights:
            if (layer_i, FUSED_TARGETS[module][0]) not in self.layers:
                raise AdapterError(
                    f"adapter {adapter.name!r}: target module layers.{layer_i}.{module} is not a dense "
                    "projection of the base model"
                )
        return adapter

    def ensure_loaded(self, slot: int, key: str) -> None:
        """Copy adapter version `key` into `slot` unless it is there already (the slot policy assigned
        it)."""
        if self.loaded[slot] == key:
            return
        adapter = self.versions[key]
        parts: dict[tuple[int, str], dict[str | int | None, tuple[torch.Tensor, torch.Tensor]]] = {}
        for (layer_i, module), w in adapter.weights.items():
            path, sub = FUSED_TARGETS[module]
            parts.setdefault((layer_i, path), {})[sub] = (w.a.to(self.device), w.b.to(self.device))
        with torch.no_grad():
            for layer_key, lora in self.layers.items():
                lora.load(slot, parts.get(layer_key, {}))
        self.loaded[slot] = key
        self.loads_total += 1

    def slot_of(self, chunk: ScheduledChunk) -> int:
        seq = chunk.seq
        if seq.params.adapter is None:
            return -1
        self.ensure_loaded(seq.lora_slot, seq.params.adapter)
        return seq.lora_slot

    def prepare_segments(self, chunks: list[ScheduledChunk]) -> None:
        """An eager step: each token's slot from its sequence's adapter."""
        slots = [self.slot_of(c) for c in chunks]
        if all(s < 0 for s in slots):
            self.batch.clear()
            return
        self.batch.set_segments(
            [s for s, c in zip(slots, chunks, strict=True) for _ in range(c.num_tokens)], self.device
        )

    def slots_for(self, chunks: list[ScheduledChunk], rows: int) -> list[int]:
        """A decode step padded to `rows`: each row's slot, -1 for base-model and padding rows."""
        return [self.slot_of(c) for c in chunks] + [-1] * (rows - len(chunks))
