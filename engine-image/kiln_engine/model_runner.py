"""Owns torch and the device: the model, the paged KV cache tensors, per-step batch tensors, sampling.

Given the scheduler's chunks it builds one flattened varlen batch (token ids, positions, slot
mapping, block tables), runs the model once, computes logits only for rows that sample, and samples.
It never decides policy. The KV cache is one tensor `[2, layers, num_blocks, block_size, kv_heads,
head_dim]` in `EngineConfig.kv_cache_dtype`; each attention layer holds views of its K and V planes
(and, for fp8, of its rows of `kv_scales` [2, layers, kv_heads]).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import torch

from kiln_engine.config import EngineConfig
from kiln_engine.interface import TokenLogprob
from kiln_engine.layers.attention import (
    FP8_KV_DTYPE,
    AttentionMetadata,
    check_fp8_kv_support,
    kv_cache_torch_dtype,
    make_backend,
)
from kiln_engine.loader import load_model, load_model_config
from kiln_engine.lora_layers import LoraRuntime
from kiln_engine.pipeline import PipelineExecutor
from kiln_engine.sampler import SampledTokens, Sampler, SampleRequest
from kiln_engine.scheduler import ScheduledChunk

log = logging.getLogger(__name__)


def runner_device(config: EngineConfig) -> torch.device:
    """The device of this rank: a bare "cuda" under tensor/pipeline parallelism means one GPU per rank."""
    device = torch.device(config.device)
    tp = config.tensor_parallel_size
    if device.type == "cuda" and device.index is None and tp * config.pipeline_parallel_size > 1:
        rank = config.pipeline_parallel_rank * tp + config.tensor_parallel_rank
        device = torch.device("cuda", rank % torch.cuda.device_count())
    return device


def attention_backend_name(config: EngineConfig, device: torch.device) -> str:
    """Decode graphs on GPU need the Triton kernel: the torch reference pads every sequence to
    max_model_len under a graph, which would not fit in memory at serving sizes. Otherwise "auto"
    stays for `make_backend` to resolve by device (Triton on CUDA)."""
    name = config.attention_backend
    if config.cuda_graphs and device.type == "cuda":
        if name == "auto":
            return "triton"
        if name != "triton":
            raise ValueError(f"cuda_graphs on GPU needs attention_backend 'triton' (or 'auto'), not {name!r}")
    return name


def use_fused_kernels(model: torch.nn.Module, fused: bool) -> None:
    """Switch every layer with a Triton fast path (norms, SwiGLU, RoPE + KV store) on or off."""
    for module in model.modules():
        if hasattr(module, "fused"):
            setattr(module, "fused", fused)  # noqa: B010 (nn.Module types attributes as tensors)


def cache_slots(table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """The KV cache slots of positions [start, end) of a sequence with block table `table`."""
    slots: list[int] = []
    pos = start
    while pos < end:  # one slice per block, not one op per token
        block_end = min(end, (pos // block_size + 1) * block_size)
        base = table[pos // block_size] * block_size - (pos // block_size) * block_size
        slots.extend(range(base + pos, base + block_end))
        pos = block_end
    return slots


class HiddenStateSink(Protocol):
    """Takes the states of every token a forward pass computed (`ModelRunner.sink_features`: the
    final normed hidden states, or an EAGLE-3 head's layers' streams): an EAGLE head's input
    (kiln_engine.eagle)."""

    def observe(self, chunks: list[ScheduledChunk], hidden: torch.Tensor) -> None:
        """`hidden` [tokens of `chunks` in order, feature width]; valid until the next forward pass."""

    def release(self, request_id: str) -> None:
        """Forget a finished or aborted request."""


class ModelRunner:
    """Runs the model for the scheduler's chunks on one device (one tensor-parallel rank)."""

    def __init__(
        self,
        model_path: str | Path,
        config: EngineConfig,
        extra_block_bytes: int = 0,
        aux_layers: tuple[int, ...] = (),
    ) -> None:
        """`extra_block_bytes`: what another cache indexed by the same blocks (an EAGLE head's)
        takes per block, counted when the number of blocks is chosen. `aux_layers`: the layers whose
        incoming residual streams `hidden_sink` gets instead of the final hidden states (EAGLE-3)."""
        self.config = config
        self.extra_block_bytes = extra_block_bytes
        self.hidden_sink: HiddenStateSink | None = None
        self.device = runner_device(config)
        model_config = load_model_config(model_path)
        self.max_model_len = config.max_model_len or model_config.max_position_embeddings
        self.model, self.model_config, self.dtype = load_model(
            model_path, config, self.max_model_len, self.device
        )
        if aux_layers:
            decoder = getattr(self.model, "model", None)
            if not hasattr(decoder, "aux_layers"):
                raise ValueError(
                    f"{self.model_config.architecture} cannot hand an EAGLE-3 head its layers' states"
                )
            decoder.aux_layers = aux_layers  # type: ignore[union-attr]
        self.feature_width = self.model_config.hidden_size * max(1, len(aux_layers))
        self.lora: LoraRuntime | None = None
        if config.max_loras:
            self.lora = LoraRuntime(self.model, self.model_config, config, self.dtype, self.device)
        self.block_size = config.block_size
        self.backend = make_backend(attention_backend_name(config, self.device), self.device)
        layers = self.model.attention_layers()
        for layer in layers:
            layer.backend = self.backend
        # The backend names the kernel family: "torch" is the reference everywhere, "triton" also
        # fuses the elementwise work between GEMMs.
        use_fused_kernels(self.model, self.backend.name == "triton")
        self.kv_dtype = kv_cache_torch_dtype(config.kv_cache_dtype, self.dtype)
        if self.kv_dtype == FP8_KV_DTYPE:
            cap = torch.cuda.get_device_capability(self.device) if self.device.type == "cuda" else None
            check_fp8_kv_support(self.backend.name, self.device.type, cap)
        self.num_blocks = config.num_kv_blocks or self._auto_num_blocks()
        first = layers[0]
        # With decode graphs, one extra block past the managed ones absorbs the padding rows' writes.
        self.kv_cache = torch.zeros(
            2,
            len(layers),
            self.num_blocks + (1 if config.cuda_graphs else 0),
            self.block_size,
            first.num_kv_heads,
            first.head_dim,
            dtype=self.kv_dtype,
            device=self.device,
        )
        # Unit scales (no calibration yet): e4m3 keeps 3 mantissa bits from 2**-6 to 448, which
        # covers the keys and values of the models served; `set_kv_scales` installs others.
        self.kv_scales: torch.Tensor | None = None
        if self.kv_dtype == FP8_KV_DTYPE:
            self.kv_scales = torch.ones(2, len(layers), first.num_kv_heads, device=self.device)
        for i, layer in enumerate(layers):
            layer.k_cache = self.kv_cache[0, i]
            layer.v_cache = self.kv_cache[1, i]
            if self.kv_scales is not None:
                layer.k_scale = self.kv_scales[0, i]
                layer.v_scale = self.kv_scales[1, i]
        self.sampler = Sampler(self.device, config.seed, frozenset(self.model_config.eos_token_ids))
        self.decode_graphs: DecodeGraphs | None = None
        if config.cuda_graphs:
            keep_hidden = config.speculative == "eagle"
            self.decode_graphs = DecodeGraphs(self, capture_sizes(graph_rows(config)), keep_hidden)
        self.pipeline: PipelineExecutor | None = None
        if config.pipeline_parallel_size > 1:
            self.pipeline = PipelineExecutor(self)

    def sink_features(self, hidden: torch.Tensor) -> torch.Tensor:
        """What `hidden_sink` takes from a forward pass that returned `hidden`: the final hidden
        states, or the aux layers' incoming residual streams when there are aux layers."""
        aux = getattr(getattr(self.model, "model", None), "aux_hidden", None)
        return aux if aux is not None else hidden

    def kv_block_bytes(self) -> int:
        layers = self.model.attention_layers()
        a = layers[0]
        elem = torch.empty((), dtype=self.kv_dtype).element_size()
        return 2 * len(layers) * self.block_size * a.num_kv_heads * a.head_dim * elem

    def set_kv_scales(self, scales: torch.Tensor) -> None:
        """Install fp8 KV scales [2 (K, V), layers, kv_heads]; in place, so captured graphs see them.

        Only before anything is cached: values already stored were divided by the old scales.
        """
        if self.kv_scales is None:
            raise ValueError(f"the KV cache is {self.kv_dtype}, not fp8: it has no scales")
        if scales.shape != self.kv_scales.shape or not bool((scales > 0).all()):
            raise ValueError(f"fp8 KV scales must be positive, of shape {tuple(self.kv_scales.shape)}")
        self.kv_scales.copy_(scales)

    def _auto_num_blocks(self) -> int:
        per_block = self.kv_block_bytes() + self.extra_block_bytes
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free
            budget = int(total * self.config.gpu_memory_utilization) - used - self._activation_reserve()
        else:
            budget = self.config.cpu_kv_cache_bytes
        max_useful = self.config.max_num_seqs * -(-self.max_model_len // self.block_size)
        blocks = min(budget // per_block, max_useful)
        if torch.distributed.is_initialized():
            # Every rank runs the same scheduler, so every rank must see the same number of blocks.
            t = torch.tensor([blocks], dtype=torch.int64, device=self.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
            blocks = int(t.item())
        if blocks < 1:
            raise RuntimeError(
                f"no memory left for the KV cache (one block is {per_block} bytes); "
                "lower max_model_len or give the engine more memory"
            )
        return int(blocks)

    def _activation_reserve(self) -> int:
        """Rough peak memory outside the KV cache: one eager step (MLP intermediates, logits and
        sampling's float copies dominate) plus the decode graphs' pool, which keeps the largest
        graph's intermediates and the logits buffer they share."""
        cfg = self.model_config
        elem = torch.empty((), dtype=self.dtype).element_size()
        per_token = (4 * cfg.hidden_size + 3 * cfg.intermediate_size) * elem
        seqs, vocab = self.config.max_num_seqs, cfg.vocab_size
        eager = self.config.max_tokens_per_step * per_token + seqs * vocab * (elem + 4 * 3)
        rows = graph_rows(self.config)
        graphs = rows * (per_token + vocab * (elem + 4 + 4)) if self.config.cuda_graphs else 0
        return eager + graphs + (512 << 20)

    def _prepare(
        self, chunks: list[ScheduledChunk]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int], list[SampleRequest]]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        sample_reqs: list[SampleRequest] = []
        tables: list[list[int]] = []
        for c in chunks:
            seq, start, n = c.seq, c.start, c.num_tokens
            end = start + n
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(cache_slots(table, start, end, bs))
            query_start.append(query_start[-1] + n)
            seq_lens.append(end)
            tables.append(table)
            if c.samples:
                sample_rows.append(query_start[-1] - 1)
                sample_reqs.append(SampleRequest.of(seq))
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        if self.lora is not None:  # every forward of these chunks (verify steps too) runs their adapters
            self.lora.prepare_segments(chunks)

        tensor = self._to_device

        query_lens = [query_start[i + 1] - query_start[i] for i in range(len(chunks))]
        meta = AttentionMetadata(
            slot_mapping=tensor(slots, torch.int64),
            query_start_loc=tensor(query_start, torch.int32),
            seq_lens=tensor(seq_lens, torch.int32),
            query_lens=tensor(query_lens, torch.int32),
            block_tables=tensor(padded, torch.int32),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            block_size=bs,
        )
        return tensor(input_ids, torch.int64), tensor(positions, torch.int64), meta, sample_rows, sample_reqs

    def _to_device(self, data: list[int] | list[list[int]], dtype: torch.dtype) -> torch.Tensor:
        """Host list -> device tensor through pinned memory, without waiting for the device."""
        t = torch.tensor(data, dtype=dtype)
        return t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else t

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> tuple[list[int], list[TokenLogprob | None]]:
        """Run one step; return the sampled token (and logprobs) of each chunk that samples, in order."""
        return self.execute_async(chunks).resolve()

    @torch.inference_mode()
    def execute_async(
        self,
        chunks: list[ScheduledChunk],
        inputs_from: SampledTokens | None = None,
        defer_masks: bool = False,
    ) -> SampledTokens:
        """Enqueue one step and its sampling without waiting for the device.

        `inputs_from`: the still unread tokens of the step before, one per chunk in the same order,
        which are this decode step's input tokens (their places in `token_ids` hold placeholders).
        `defer_masks`: a decode step replaying a graph leaves its sampling under grammar masks to
        the returned tokens' `finish()` (Sampler.sample_async), which must come before the next step.
        """
        if inputs_from is not None:
            inputs_from.finish()
        if self.pipeline is not None:
            return self.pipeline.execute(chunks)
        graphs = self.decode_graphs
        if graphs is not None and graphs.can_run(chunks):
            reqs = [SampleRequest.of(c.seq) for c in chunks]
            sampling = self.sampler.prepare(reqs, self.model_config.vocab_size, inputs_from)
            logits = graphs.run(chunks, None if inputs_from is None else inputs_from.tokens)
            return self.sampler.sample_async(logits, sampling, defer_masks=defer_masks)
        if inputs_from is not None:
            raise ValueError("only a decode step that replays a graph can take device-resident inputs")
        input_ids, positions, meta, sample_rows, sample_reqs = self._prepare(chunks)
        sampling = self.sampler.prepare(sample_reqs, self.model_config.vocab_size)
        rows = self._to_device(sample_rows, torch.int64)
        self.backend.prepare(meta)
        hidden = self.model(input_ids, positions, meta)
        if self.hidden_sink is not None:
            self.hidden_sink.observe(chunks, self.sink_features(hidden))
        if not sample_rows:
            return SampledTokens(torch.empty(0, dtype=torch.int64), None, sampling)
        logits = self.model.compute_logits(hidden.index_select(0, rows))
        return self.sampler.sample_async(logits, sampling)

    def release(self, request_id: str) -> None:
        self.sampler.release(request_id)
        if self.decode_graphs is not None:
            self.decode_graphs.release(request_id)
        if self.hidden_sink is not None:
            self.hidden_sink.release(request_id)


def graph_rows(config: EngineConfig) -> int:
    """The most rows a decode graph runs: a row per sequence, or with speculation a row per token of
    a verify step (1 + K per sequence; DecodeGraphs.run_tails)."""
    return config.max_num_seqs * (1 + (config.num_speculative_tokens if config.speculative else 0))


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Padded decode batch sizes: 1, 2, 4, then steps of 8 to 64, 16 to 128, 32 to 256, 64 beyond.

    Padding costs at most a quarter of a step, and a 1,024-sequence engine captures 31 graphs, not 131.
    """
    sizes = [1, 2, 4, *range(8, 64, 8), *range(64, 128, 16), *range(128, 256, 32), *range(256, 1 << 20, 64)]
    return [b for b in sizes if b < max_num_seqs] + [max_num_seqs]


def decode_metas(
    sizes: list[int],
    slot_mapping: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    block_size: int,
) -> dict[int, AttentionMetadata]:
    """Attention metadata of a step with one token per row at each padded batch size, over static
    buffers a graph reads (sliced to the size): the rows' cache slots, context lengths and block
    tables [rows, max blocks], whose every column a row may read up to its length."""
    rows, max_blocks = block_tables.shape
    query_start_loc = torch.arange(rows + 1, dtype=torch.int32, device=block_tables.device)
    query_lens = torch.ones(rows, dtype=torch.int32, device=block_tables.device)
    return {
        bs: AttentionMetadata(
            slot_mapping=slot_mapping[:bs],
            query_start_loc=query_start_loc[: bs + 1],
            seq_lens=seq_lens[:bs],
            query_lens=query_lens[:bs],
            block_tables=block_tables[:bs],
            max_query_len=1,
            max_seq_len=max_blocks * block_size,
            block_size=block_size,
        )
        for bs in sizes
    }


class DecodeGraphs:
    """Decode-only steps at fixed, padded batch sizes: replayed CUDA graphs on GPU, eager elsewhere.

    A step where every sequence decodes one token is padded up to the next captured size. Inputs go
    into static buffers. Block tables live on the device between steps: each decoding sequence owns
    a row of `table_store`, and a step sends only the block ids appended since the last one (a
    rewrite after preemption), then gathers the batch's rows into the graph's table with one
    index_select, so host work per step grows with the batch, not with its context. Stale columns
    beyond a sequence's length are masked by its seq_len. Padding rows decode token 0 at position 0
    with a context of one token held in a scratch block the block manager never hands out, so they
    write and read nothing real. The graph covers embedding to logits; sampling runs after it. On
    CPU the same buffers and padding run eagerly, which is how the tests check the padding logic.
    Capturing needs a graph-safe attention backend (static shapes, no host reads): use "triton".
    """

    def __init__(self, runner: ModelRunner, sizes: list[int], keep_hidden: bool = False) -> None:
        """`keep_hidden`: every step also leaves its hidden states for `runner.hidden_sink`."""
        self.runner = runner
        self.sizes = sorted(set(sizes))
        dev, max_bs = runner.device, self.sizes[-1]
        self.block_size = runner.block_size
        self.max_blocks = -(-runner.max_model_len // runner.block_size)
        self.scratch_block = runner.num_blocks
        i64, i32 = torch.int64, torch.int32
        self.input_ids = torch.zeros(max_bs, dtype=i64, device=dev)
        self.positions = torch.zeros(max_bs, dtype=i64, device=dev)
        self.slot_mapping = torch.full((max_bs,), self.scratch_block * self.block_size, dtype=i64, device=dev)
        self.seq_lens = torch.ones(max_bs, dtype=i32, device=dev)
        self.block_tables = torch.full((max_bs, self.max_blocks), self.scratch_block, dtype=i32, device=dev)
        # Rows of device-resident block tables; the last row is all scratch, for padding.
        num_rows = 2 * max_bs + 1
        self.table_store = torch.full((num_rows, self.max_blocks), self.scratch_block, dtype=i32, device=dev)
        self.scratch_row = num_rows - 1
        self.free_rows = list(range(num_rows - 1))
        self.rows: dict[str, int] = {}
        self.row_state: dict[str, tuple[int, int]] = {}  # request -> (its preemptions, blocks sent)
        self.metas = decode_metas(
            self.sizes, self.slot_mapping, self.seq_lens, self.block_tables, self.block_size
        )
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # With LoRA slots, graphs of the same sizes without LoRA serve steps where no sequence has
        # an adapter: the masked form costs every slot's GEMMs whether or not a row uses one.
        self.base_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # Every graph writes its logits into this one buffer. A graph's own output would stay
        # allocated in the shared pool for the graph's life, so 60 sizes up to 4,096 sequences
        # would hold 60 logits tensors (tens of GB at a 128k vocabulary) and run out of memory.
        self.logits = torch.empty(0, device=dev)  # allocated by _capture
        # With an EAGLE head every graph also leaves its hidden states here (the head's input).
        self.hidden: torch.Tensor | None = None
        if keep_hidden:
            size = (max_bs, runner.feature_width)
            self.hidden = torch.empty(size, dtype=runner.dtype, device=dev)
        # A step's inputs cross to the device through one pinned buffer that lives as long as the
        # graphs: pinning fresh memory every step cost more host time than the rest of a batch-1 step.
        self.staging_host = torch.empty(0, dtype=i64)
        self.staging_device = torch.empty(0, dtype=i64, device=dev)
        self.staged = torch.cuda.Event() if dev.type == "cuda" else None
        lora = runner.lora
        self.lora_slots = None if lora is None else torch.full((max_bs,), -1, dtype=i32, device=dev)
        if dev.type == "cuda":
            self._capture()

    def _forward(self, bs: int, lora: bool = True) -> torch.Tensor:
        """Logits of a padded step of `bs` rows; `lora`: with the rows' adapters (else none)."""
        meta = self.metas[bs]
        self.runner.backend.prepare(meta)
        if self.runner.lora is not None and self.lora_slots is not None:
            if lora:
                self.runner.lora.batch.set_slots(self.lora_slots[:bs])
            else:
                self.runner.lora.batch.clear()
        model = self.runner.model
        hidden = model(self.input_ids[:bs], self.positions[:bs], meta)
        if self.hidden is not None:
            self.hidden[:bs].copy_(self.runner.sink_features(hidden))
        return model.compute_logits(hidden)

    @torch.inference_mode()
    def _capture(self) -> None:
        vocab = self.runner.model_config.vocab_size
        self.logits = torch.empty(self.sizes[-1], vocab, dtype=torch.float32, device=self.runner.device)
        pool = None
        variants = [(self.graphs, True)]
        if self.runner.lora is not None:
            variants.append((self.base_graphs, False))
        for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory pool
            for graphs, lora in variants:
                self._forward(bs, lora)  # warm-up: kernel compilation, library workspaces
                torch.cuda.synchronize(self.runner.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.logits[:bs].copy_(self._forward(bs, lora))
                pool = graph.pool()
                graphs[bs] = graph
        stats = torch.cuda.memory_stats(self.runner.device)
        log.info(
            "captured %d decode graphs up to %d sequences; memory reserved %.2f GiB, peak %.2f GiB",
            len(self.graphs) + len(self.base_graphs),
            self.sizes[-1],
            stats["reserved_bytes.all.current"] / 2**30,
            stats["allocated_bytes.all.peak"] / 2**30,
        )

    def _stage(self, values: list[int]) -> torch.Tensor:
        """`values` on the device, in one host-to-device copy that does not wait for the device."""
        if self.staged is None:
            return torch.tensor(values, dtype=torch.int64)
        n = len(values)
        self.staged.synchronize()  # the last step's copy has read the buffer (long done, normally)
        if n > self.staging_host.numel():
            size = max(n, 2 * self.staging_host.numel(), 1024)
            self.staging_host = torch.empty(size, dtype=torch.int64, pin_memory=True)
            self.staging_device = torch.empty(size, dtype=torch.int64, device=self.runner.device)
        self.staging_host.numpy()[:n] = values
        dev = self.staging_device[:n]
        dev.copy_(self.staging_host[:n], non_blocking=True)
        self.staged.record()
        return dev

    def can_run(self, chunks: list[ScheduledChunk]) -> bool:
        return len(chunks) <= self.sizes[-1] and all(
            c.num_tokens == 1 and c.start + 1 == len(c.seq.token_ids) for c in chunks
        )

    def can_run_tails(self, chunks: list[ScheduledChunk]) -> bool:
        """Whether `run_tails` takes these chunks: each the last tokens of its sequence, all of them
        fitting the largest graph, and no adapters (a graph's LoRA slots are one per sequence)."""
        return (
            self.runner.lora is None
            and sum(c.num_tokens for c in chunks) <= self.sizes[-1]
            and all(c.start + c.num_tokens == len(c.seq.token_ids) for c in chunks)
        )

    def run_tails(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Logits [tokens, vocab] of every token of `chunks`, in order, for chunks that end their
        sequences (a verify step: each sequence's last real token and its drafts). Each token is a
        row of a decode step, attending through its sequence's block table up to its own position;
        every layer writes the step's K/V before it attends, so a token sees those before it in its
        chunk, as in a causal forward pass of the chunk. Attention reads a sequence's context once
        per token instead of once per chunk, which costs little next to the weights at verify sizes."""
        rows = [ScheduledChunk(c.seq, p, 1) for c in chunks for p in range(c.start, c.start + c.num_tokens)]
        return self.run(rows)

    def release(self, request_id: str) -> None:
        row = self.rows.pop(request_id, None)
        self.row_state.pop(request_id, None)
        if row is not None:
            self.free_rows.append(row)

    def run(self, chunks: list[ScheduledChunk], input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [len(chunks), vocab] of one decode step; `input_ids` [len(chunks)] on the device
        replaces the chunks' input tokens (the step before's tokens, not yet read by the host)."""
        n = len(chunks)
        bs = next(b for b in self.sizes if b >= n)
        bsz, pad = self.block_size, bs - n
        if len(self.free_rows) < n:  # rows held by sequences not decoding now (preempted, waiting)
            active = {c.seq.request_id for c in chunks}
            for rid in [r for r in self.rows if r not in active]:
                self.release(rid)
        ids, pos, slots, lens, rows = [], [], [], [], []
        up_rows: list[int] = []
        up_cols: list[int] = []
        up_vals: list[int] = []
        row_of, row_state, free_rows = self.rows, self.row_state, self.free_rows  # locals: 4,096 rounds
        for c in chunks:
            seq, p = c.seq, c.start
            table = seq.block_table
            rid = seq.request_id
            row = row_of.get(rid)
            if row is None:
                row = row_of[rid] = free_rows.pop()
            state = row_state.get(rid)
            sent = state[1] if state is not None and state[0] == seq.num_preemptions else 0
            if len(table) > sent:
                up_rows.extend([row] * (len(table) - sent))
                up_cols.extend(range(sent, len(table)))
                up_vals.extend(table[sent:])
                row_state[rid] = (seq.num_preemptions, len(table))
            ids.append(seq.token_ids[p])
            pos.append(p)
            slots.append(table[p // bsz] * bsz + p % bsz)
            lens.append(p + 1)
            rows.append(row)
        u = len(up_rows)
        flat = ids + [0] * pad
        flat += pos + [0] * pad
        flat += slots + [self.scratch_block * bsz] * pad
        flat += lens + [1] * pad
        flat += rows + [self.scratch_row] * pad
        lora = self.runner.lora
        adapters = False  # whether any row runs an adapter
        if lora is not None:
            row_slots = lora.slots_for(chunks, bs)
            adapters = any(s >= 0 for s in row_slots)
            flat += row_slots
        lora_rows = bs if lora is not None else 0
        flat += up_rows + up_cols + up_vals
        dev = self._stage(flat)
        self.input_ids[:bs].copy_(dev[0:bs])
        if input_ids is not None:
            self.input_ids[:n].copy_(input_ids)
        self.positions[:bs].copy_(dev[bs : 2 * bs])
        self.slot_mapping[:bs].copy_(dev[2 * bs : 3 * bs])
        self.seq_lens[:bs].copy_(dev[3 * bs : 4 * bs])
        if self.lora_slots is not None:
            self.lora_slots[:bs].copy_(dev[5 * bs : 6 * bs])
        if u:
            upd = dev[5 * bs + lora_rows :].view(3, u)
            self.table_store.index_put_((upd[0], upd[1]), upd[2].to(torch.int32))
        torch.index_select(self.table_store, 0, dev[4 * bs : 5 * bs], out=self.block_tables[:bs])
        graph = (self.graphs if adapters or lora is None else self.base_graphs).get(bs)
        if graph is None:
            logits = self._forward(bs, adapters)[:n]
        else:
            graph.replay()
            logits = self.logits[:n]
        if self.hidden is not None and self.runner.hidden_sink is not None:
            self.runner.hidden_sink.observe(chunks, self.hidden[:n])
        return logits
