"""The router's adapters' pure parts: the engine gauges it reads from the engine's own /metrics text,
the ready endpoints of EndpointSlices, and the `--endpoints` list."""

from __future__ import annotations

import pytest

from kiln_engine.interface import EngineStats
from kiln_engine.server.metrics import ServerMetrics
from kiln_router.discovery import parse_endpoints, ready_urls
from kiln_router.replicas import engine_gauges


def test_the_router_reads_the_gauges_the_engine_exports() -> None:
    metrics = ServerMetrics("m")
    metrics.observe_stats(EngineStats(waiting=3, running=5, kv_blocks_total=200, kv_blocks_used=50))
    assert engine_gauges(metrics.render().decode()) == {"queue_depth": 3, "running": 5, "kv_usage": 0.25}


def endpoint(address: str, ready: bool | None) -> dict:
    conditions = {} if ready is None else {"ready": ready}
    return {"addresses": [address], "conditions": conditions}


def test_only_ready_endpoints_on_the_named_port_are_routed_to() -> None:
    slices = [
        {"ports": [{"name": "metrics", "port": 9090}, {"name": "http", "port": 8000}],
         "endpoints": [endpoint("10.0.0.1", True), endpoint("10.0.0.2", False), endpoint("10.0.0.3", None)]},
        {"ports": [{"name": "http", "port": 8000}], "endpoints": [endpoint("fd00::4", True)]},
        {"ports": [{"name": "other", "port": 1}], "endpoints": [endpoint("10.0.0.5", True)]},
        {"ports": None, "endpoints": None},
    ]  # fmt: skip
    assert ready_urls(slices, "http") == {
        "http://10.0.0.1:8000",
        "http://10.0.0.3:8000",
        "http://[fd00::4]:8000",
    }


def test_endpoint_lists_are_read_or_refused_clearly() -> None:
    assert parse_endpoints("127.0.0.1:8001, http://h:8002/") == ["http://127.0.0.1:8001", "http://h:8002"]
    for bad in ("", "h", "http://h:1/v1", "ftp://h:1"):
        with pytest.raises(ValueError):
            parse_endpoints(bad)
