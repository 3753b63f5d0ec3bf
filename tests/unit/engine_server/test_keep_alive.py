"""Keep-alive across parts: every Kiln client reuses an idle connection for less time than the server
it talks to keeps one open, so no request is sent on a connection the server is closing (with both
at 5 s, 1 of 942 requests of CI's autoscaling burst failed with a ReadError)."""

from __future__ import annotations

import httpx
import uvicorn

from kiln_engine.server.drain import server_config
from kiln_engine.server.proxy import UPSTREAM_KEEP_ALIVE_S
from kiln_router.server import Settings as RouterSettings


def engine_keep_alive_s() -> float:
    return float(server_config(object(), "127.0.0.1", 8000, "info", drain_timeout_s=30).timeout_keep_alive)


def test_router_drops_idle_engine_connections_before_the_engine_does() -> None:
    assert RouterSettings().keepalive_s < engine_keep_alive_s()


def test_httpx_clients_with_default_limits_drop_them_before_the_engine_does() -> None:
    # the autoscaler's metric scrapes and the demo's load use httpx's default keep-alive expiry
    expiry = httpx.Limits().keepalive_expiry
    assert expiry is not None and expiry < engine_keep_alive_s()


def test_engine_keeps_connections_longer_than_common_load_balancers_reuse_them() -> None:
    # nginx's upstream keepalive_timeout and AWS ALB's idle timeout: 60 s
    assert engine_keep_alive_s() > 60


def test_proxy_drops_idle_upstream_connections_before_trtllm_serve_does() -> None:
    # trtllm-serve runs uvicorn with uvicorn's default keep-alive
    default = uvicorn.Config(object()).timeout_keep_alive  # type: ignore[arg-type]
    assert default > UPSTREAM_KEEP_ALIVE_S
