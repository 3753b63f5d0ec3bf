"""Where the replicas are: a fixed list (`--endpoints`), or the ready endpoints of a Kubernetes
Service's EndpointSlices, followed by a watch. Adapters only: they hand base URLs to a callback."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"  # set by the EndpointSlice controller


def parse_endpoints(value: str) -> list[str]:
    """`http://host:port,...` (or `host:port`) into base URLs; a malformed one is a clear error."""
    urls = []
    for item in (v.strip() for v in value.split(",")):
        if not item:
            continue
        url = item if "://" in item else f"http://{item}"
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.port is None:
            raise ValueError(f"endpoint {item!r} is not http(s)://host:port")
        if parts.path not in ("", "/"):
            raise ValueError(f"endpoint {item!r} has a path; give the replica's base URL")
        urls.append(url.rstrip("/"))
    if not urls:
        raise ValueError("no endpoints given")
    return urls


def ready_urls(slices: Iterable[Mapping[str, Any]], port_name: str) -> set[str]:
    """Base URLs of the ready endpoints in EndpointSlices (as dicts, the API's camelCase keys), on the
    port named `port_name`. A terminating endpoint is not ready, so a draining replica leaves here."""
    urls = set()
    for s in slices:
        ports = [p.get("port") for p in s.get("ports") or [] if p.get("name") == port_name]
        if not ports or ports[0] is None:
            continue
        for endpoint in s.get("endpoints") or []:
            if (endpoint.get("conditions") or {}).get("ready") is False:
                continue  # absent means ready, per the EndpointSlice API
            for address in endpoint.get("addresses") or []:
                host = f"[{address}]" if ":" in address else address
                urls.add(f"http://{host}:{ports[0]}")
    return urls


class EndpointSliceWatch:
    """Follows a Service's EndpointSlices in a thread; calls `on_change(urls)` on every change."""

    def __init__(
        self,
        service: str,
        namespace: str,
        port_name: str,
        on_change: Callable[[set[str]], None],
        api_client: Any = None,  # a kubernetes ApiClient; default: in-cluster config, else kubeconfig
    ) -> None:
        self.service, self.namespace, self.port_name = service, namespace, port_name
        self.on_change = on_change
        self.api_client = api_client
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="endpointslice-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        from kubernetes import client, config, watch

        if self.api_client is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
        api = client.DiscoveryV1Api(self.api_client)
        selector = f"{SERVICE_NAME_LABEL}={self.service}"
        while not self._stop.is_set():
            try:
                listed = _as_dict(
                    api, api.list_namespaced_endpoint_slice(self.namespace, label_selector=selector)
                )
                slices = {s["metadata"]["name"]: s for s in listed["items"]}
                self._publish(slices)
                stream = watch.Watch().stream(
                    api.list_namespaced_endpoint_slice, self.namespace, label_selector=selector,
                    resource_version=listed["metadata"]["resourceVersion"], timeout_seconds=300,
                )  # fmt: skip
                for event in stream:
                    obj = _as_dict(api, event["object"])
                    if event["type"] == "DELETED":
                        slices.pop(obj["metadata"]["name"], None)
                    else:
                        slices[obj["metadata"]["name"]] = obj
                    self._publish(slices)
                    if self._stop.is_set():
                        return
            except Exception as e:  # the API server restarting, a 410 Gone: relist after a pause
                log.warning("EndpointSlice watch of %s/%s: %s; relisting", self.namespace, self.service, e)
                self._stop.wait(2)

    def _publish(self, slices: Mapping[str, Mapping[str, Any]]) -> None:
        self.on_change(ready_urls(slices.values(), self.port_name))


def _as_dict(api: Any, obj: Any) -> dict[str, Any]:
    """An API object as its JSON (camelCase keys), so `ready_urls` reads plain data."""
    return dict(api.api_client.sanitize_for_serialization(obj))
