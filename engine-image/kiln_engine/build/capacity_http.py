"""Capacity of a serving replica, measured over its OpenAI API: bursts of streamed completions with
synthetic random token-id prompts, searched by the build's method (`capacity.measure_bursts`).

Used for engines the build cannot measure in-process (several ranks, several pods, TensorRT-LLM): the
operator runs `kiln-engine measure-capacity --url http://<leader>:8000` as a Job once the first replica
is Ready. TTFT here is the time to the first streamed chunk, so it includes the HTTP path a client sees.
"""

from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

from kiln_engine.build.capacity import Burst, load_shape, measure_bursts
from kiln_engine.build.manifest import Capacity


class ReplicaError(Exception):
    """The replica did not answer as an OpenAI server should (unreachable, an error status, no stream)."""


@dataclass(frozen=True)
class Replica:
    """The served model of a replica: its name and context length (from GET /v1/models)."""

    url: str
    model: str
    max_model_len: int
    headers: dict[str, str]


def discover(url: str, api_key: str | None, wait_s: float) -> Replica:
    """The replica's model, waiting up to `wait_s` for it to answer /v1/models."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + wait_s
    while True:
        try:
            r = httpx.get(url.rstrip("/") + "/v1/models", headers=headers, timeout=10)
            r.raise_for_status()
            break
        except httpx.HTTPError as exc:
            if time.monotonic() >= deadline:
                raise ReplicaError(f"{url}/v1/models: {exc}") from exc
            time.sleep(1)
    models = r.json().get("data") or []
    if not models:
        raise ReplicaError(f"{url}/v1/models lists no model")
    card = models[0]
    max_len = card.get("max_model_len")
    if not isinstance(max_len, int) or max_len < 16:
        raise ReplicaError(f"{url}/v1/models gives no usable max_model_len ({max_len!r})")
    return Replica(url.rstrip("/"), str(card["id"]), max_len, headers)


class HttpDriver:
    """Runs bursts of concurrent streamed completions against a replica."""

    def __init__(self, replica: Replica, token_range: int, prompt_tokens: int, output_tokens: int, seed: int):
        self.replica = replica
        self.token_range = token_range
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        self.rng = random.Random(seed)

    def _one(
        self, client: httpx.Client, prompt: list[int], max_tokens: int, start: float
    ) -> tuple[float, int]:
        """(seconds from the burst's start to the first streamed token, completion tokens)."""
        body = {"model": self.replica.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
        first: float | None = None
        tokens = 0
        with client.stream("POST", self.replica.url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                raise ReplicaError(f"/v1/completions answered {r.status_code}: {r.read().decode()[:300]}")
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and first is None:
                    first = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = int(chunk["usage"].get("completion_tokens") or 0)
        if first is None:
            raise ReplicaError("/v1/completions streamed no token")
        return first, tokens

    def burst(self, concurrency: int, output_tokens: int | None = None) -> Burst:
        max_tokens = output_tokens or self.output_tokens
        prompts = [[self.rng.randrange(self.token_range) for _ in range(self.prompt_tokens)]
                   for _ in range(concurrency)]  # fmt: skip
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        with httpx.Client(headers=self.replica.headers, timeout=600, limits=limits) as client:
            gate = threading.Barrier(concurrency + 1)

            def run(prompt: list[int]) -> tuple[float, int]:
                gate.wait()
                return self._one(client, prompt, max_tokens, start)

            with ThreadPoolExecutor(concurrency) as pool:
                futures = [pool.submit(run, p) for p in prompts]
                start = time.perf_counter()
                gate.wait()
                results = [f.result() for f in futures]
            end = time.perf_counter()
        ttfts = tuple(first for first, _ in results)
        return Burst.timed(
            ttfts_s=ttfts,
            all_first_s=max(ttfts),
            decode_tokens=sum(tokens for _, tokens in results) - concurrency,
            prompt_tokens=self.prompt_tokens,
            elapsed_s=end - start,
        )


def measure_replica(
    replica: Replica,
    *,
    max_batch_size: int,
    ttft_target_ms: float,
    ttft_percentile: int,
    time_budget_s: float,
    token_range: int = 256,
    seed: int = 0,
) -> Capacity:
    """The build's capacity method against `replica`; recorded as measured on its URL."""
    prompt_tokens, output_tokens = load_shape(replica.max_model_len)
    driver = HttpDriver(replica, token_range, prompt_tokens, output_tokens, seed)
    return measure_bursts(
        driver.burst,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        max_batch_size=max_batch_size,
        ttft_target_ms=ttft_target_ms,
        ttft_percentile=ttft_percentile,
        measured_on=f"serving replica {replica.url}",
        time_budget_s=time_budget_s,
    )
