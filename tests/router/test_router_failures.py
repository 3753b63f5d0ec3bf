"""Failure injection the real engines cannot be made to do on cue: a replica that answers 503 (as a
draining engine does), one that drops the connection after its headers, one that dies mid-stream.
Small real aiohttp upstreams on loopback; the router under test is the real one, over real HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
from aiohttp import web

from kiln_router.metrics import HELD, HOLDS, RETRIES
from kiln_router.pick import Policy, block_hashes, rank
from kiln_router.replicas import Replicas
from kiln_router.server import Router, Settings

POLICY = Policy(block_chars=16, affinity_blocks=4)
EVENTS = [b'data: {"choices":[{"text":"t%d"}]}\n\n' % i for i in range(5)] + [b"data: [DONE]\n\n"]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def good(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    for event in EVENTS:
        await response.write(event)
        await asyncio.sleep(0.01)
    await response.write_eof()
    return response


async def draining(_: web.Request) -> web.Response:
    return web.json_response({"error": {"message": "draining"}}, status=503)


async def dies_after_headers(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    assert request.transport is not None
    request.transport.close()
    return response


async def dies_mid_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    await response.write(EVENTS[0])
    await asyncio.sleep(0.05)
    assert request.transport is not None
    request.transport.close()
    return response


class Upstream:
    def __init__(self, handler: Handler) -> None:
        self.handler, self.posts = handler, 0
        self.app = web.Application()
        self.app.router.add_post("/v1/completions", self.post)
        self.app.router.add_get("/metrics", self.metrics)

    async def post(self, request: web.Request) -> web.StreamResponse:
        self.posts += 1
        await request.read()
        return await self.handler(request)

    async def metrics(self, _: web.Request) -> web.Response:
        return web.Response(text="kiln_engine_queue_depth 0\n")


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


@pytest.fixture()
async def cluster(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, list[str], list[Upstream]]]:
    """The router in front of upstreams with the handlers the test names (`indirect` parameter)."""
    upstreams = [Upstream(h) for h in request.param]
    runners, urls = [], []
    for upstream in upstreams:
        runner, url = await serve(upstream.app)
        runners.append(runner)
        urls.append(url)
    replicas = Replicas(interval=0.1)
    replicas.set_endpoints(urls)
    runner, router = await serve(Router(replicas, Settings(policy=POLICY)).app())
    runners.append(runner)
    yield router, urls, upstreams
    for r in reversed(runners):
        await r.cleanup()


def prompt_for(url: str, urls: list[str], salt: str = "") -> str:
    """A prompt whose affinity target is `url`."""
    for i in range(1000):
        prompt = f"{salt}prompt number {i} " * 8
        if rank(block_hashes(prompt, POLICY.block_chars, POLICY.affinity_blocks)[-1], urls)[0] == url:
            return prompt
    raise AssertionError("no prompt maps there")


async def post(client: httpx.AsyncClient, router: str, prompt: str) -> httpx.Response:
    return await client.post(router + "/v1/completions", json={"prompt": prompt, "stream": True})


async def retries(client: httpx.AsyncClient, router: str, cause: str) -> float:
    text = (await client.get(router + "/metrics")).text
    line = next(x for x in text.splitlines() if x.startswith(f'{RETRIES}{{cause="{cause}"}}'))
    return float(line.rsplit(" ", 1)[1])


@pytest.mark.parametrize(
    ("cluster", "cause"),
    [((draining, good), "unavailable"), ((dies_after_headers, good), "first_byte")],
    indirect=["cluster"],
    ids=["503-draining", "closed-after-headers"],
)
async def test_a_replica_failing_before_its_first_byte_is_replaced(cluster, cause: str) -> None:
    router, urls, (bad, fine) = cluster
    async with httpx.AsyncClient(timeout=10) as client:
        responses = [await post(client, router, prompt_for(urls[0], urls, str(i))) for i in range(4)]
        assert [r.status_code for r in responses] == [200] * 4
        assert all(r.content == b"".join(EVENTS) for r in responses)
        assert bad.posts >= 1 and fine.posts == 4
        assert await retries(client, router, cause) == bad.posts


@pytest.mark.parametrize("cluster", [(dies_mid_stream, good)], indirect=True)
async def test_a_stream_that_breaks_after_bytes_went_out_is_not_retried(cluster) -> None:
    router, urls, (bad, fine) = cluster
    async with httpx.AsyncClient(timeout=10) as client:
        with pytest.raises(httpx.RemoteProtocolError):  # the client sees the stream cut, not ended
            await post(client, router, prompt_for(urls[0], urls))
        assert (bad.posts, fine.posts) == (1, 0)


@pytest.mark.parametrize("cluster", [(draining, draining)], indirect=True)
async def test_when_no_replica_takes_it_the_client_gets_a_503_to_retry_later(cluster) -> None:
    router, urls, _ = cluster
    async with httpx.AsyncClient(timeout=10) as client:
        response = await post(client, router, prompt_for(urls[0], urls))
    assert response.status_code == 503 and response.headers["retry-after"]
    assert response.json()["error"]["type"] == "service_unavailable"


def metric(text: str, name: str) -> float:
    line = next(x for x in text.splitlines() if x.startswith(name + " ") or x.startswith(name + "{"))
    return float(line.rsplit(" ", 1)[1])


@pytest.fixture()
async def empty_router(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, Replicas, str]]:
    """The router with no replica yet (Settings from the `indirect` parameter), and one upstream
    that is not in its set: (router URL, its replica set, the upstream's URL)."""
    upstream_runner, upstream = await serve(Upstream(good).app)
    replicas = Replicas(interval=0.1)
    runner, router = await serve(Router(replicas, request.param).app())
    yield router, replicas, upstream
    await runner.cleanup()
    await upstream_runner.cleanup()


@pytest.mark.parametrize("empty_router", [Settings(policy=POLICY, hold_timeout_s=30.0)], indirect=True)
async def test_with_no_replica_a_request_waits_for_the_first_to_appear(empty_router) -> None:
    router, replicas, upstream = empty_router
    async with httpx.AsyncClient(timeout=10) as client:
        waiting = asyncio.create_task(post(client, router, "a prompt that waits " * 8))
        for _ in range(100):
            await asyncio.sleep(0.02)
            if metric((await client.get(router + "/metrics")).text, HELD) == 1:
                break
        assert not waiting.done()  # held, not refused
        replicas.set_endpoints([upstream])  # a replica became ready (discovery does this)
        response = await waiting
        assert response.status_code == 200 and response.content == b"".join(EVENTS)
        text = (await client.get(router + "/metrics")).text
    assert metric(text, HELD) == 0
    assert metric(text, f'{HOLDS}{{outcome="released"}}') == 1


@pytest.mark.parametrize("empty_router", [Settings(policy=POLICY, hold_timeout_s=0.3)], indirect=True)
async def test_a_held_request_times_out_with_a_503_to_retry_later(empty_router) -> None:
    router, _, _ = empty_router
    async with httpx.AsyncClient(timeout=10) as client:
        response = await post(client, router, "nobody comes " * 8)
        text = (await client.get(router + "/metrics")).text
    assert response.status_code == 503 and response.headers["retry-after"]
    assert "no ready replica within 0.3 s" in response.json()["error"]["message"]
    assert metric(text, f'{HOLDS}{{outcome="timed_out"}}') == 1


@pytest.mark.parametrize("empty_router", [Settings(policy=POLICY, max_held=0)], indirect=True)
async def test_beyond_the_hold_queue_a_request_is_refused_at_once(empty_router) -> None:
    router, _, _ = empty_router
    async with httpx.AsyncClient(timeout=10) as client:
        response = await post(client, router, "too many " * 8)
        text = (await client.get(router + "/metrics")).text
    assert response.status_code == 503
    assert metric(text, f'{HOLDS}{{outcome="refused"}}') == 1


@pytest.mark.parametrize(
    ("empty_router", "status"),
    [(Settings(policy=POLICY), 200), (Settings(policy=POLICY, hold_timeout_s=0), 503)],
    indirect=["empty_router"],
    ids=["holding", "not-holding"],
)
async def test_with_no_replica_the_router_is_ready_only_when_it_holds_requests(
    empty_router, status: int
) -> None:
    router, _, _ = empty_router
    async with httpx.AsyncClient(timeout=10) as client:
        assert (await client.get(router + "/ready")).status_code == status
