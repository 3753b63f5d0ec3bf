"""A small async Kubernetes API client (httpx): JSON in, JSON out, and a watch as an async iterator.

The process node needs a handful of calls and long-lived watches inside one asyncio loop; the
credentials come from any kubeconfig the official client understands.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"


class KubeError(RuntimeError):
    """A non-success answer of the API server."""

    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(f"{status} {reason}: {message}" if reason else f"{status}: {message}")
        self.status = status
        self.reason = reason


def _error(response: httpx.Response) -> KubeError:
    try:
        body = response.json()
        return KubeError(response.status_code, str(body.get("message")), str(body.get("reason", "")))
    except ValueError:
        return KubeError(response.status_code, response.text[:500])


class KubeClient:
    """JSON calls against one API server."""

    def __init__(
        self,
        server: str,
        ssl_context: ssl.SSLContext | bool,
        headers: Mapping[str, str],
        ca_file: str | None = None,
    ) -> None:
        self.server = server.rstrip("/")
        self.ca_file = ca_file  # the cluster's CA, for the kubeconfig pods get
        self._ssl = ssl_context
        self._headers = dict(headers)
        self._client = httpx.AsyncClient(
            base_url=self.server, verify=ssl_context, headers=self._headers, timeout=30.0
        )

    @classmethod
    def from_kubeconfig(cls, path: str | None = None, context: str | None = None) -> KubeClient:
        """Credentials of a kubeconfig (certificates, token, files or embedded data)."""
        from kubernetes import client as kclient
        from kubernetes import config as kconfig

        configuration = kclient.Configuration()
        kconfig.load_kube_config(config_file=path, context=context, client_configuration=configuration)
        headers: dict[str, str] = {}
        token = (configuration.api_key or {}).get("authorization") or (configuration.api_key or {}).get(
            "BearerToken"
        )
        if token:
            headers["Authorization"] = token if token.startswith("Bearer ") else f"Bearer {token}"
        verify: ssl.SSLContext | bool
        if configuration.verify_ssl:
            verify = ssl.create_default_context(cafile=configuration.ssl_ca_cert or None)
            if configuration.cert_file:
                verify.load_cert_chain(configuration.cert_file, configuration.key_file)
        else:
            verify = False
        return cls(configuration.host, verify, headers, configuration.ssl_ca_cert or None)

    async def close(self) -> None:
        await self._client.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        allow_missing: bool = False,
    ) -> dict[str, Any] | None:
        content = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if content is not None else {}
        response = await self._client.request(method, path, content=content, params=params, headers=headers)
        if response.status_code == 404 and allow_missing:
            return None
        if not response.is_success:
            raise _error(response)
        data: dict[str, Any] = response.json() if response.content else {}
        return data

    async def get(self, path: str, params: Mapping[str, str] | None = None) -> dict[str, Any] | None:
        """The object at `path`, or None when it does not exist."""
        return await self.request("GET", path, params=params, allow_missing=True)

    async def create(self, path: str, body: Any) -> dict[str, Any]:
        result = await self.request("POST", path, body=body)
        assert result is not None
        return result

    async def patch(self, path: str, body: Any, content_type: str = MERGE_PATCH) -> dict[str, Any] | None:
        return await self.request("PATCH", path, body=body, content_type=content_type, allow_missing=True)

    async def delete(self, path: str, body: Any = None) -> dict[str, Any] | None:
        return await self.request("DELETE", path, body=body, allow_missing=True)

    async def watch(
        self, path: str, params: Mapping[str, str], timeout_seconds: int = 300
    ) -> AsyncIterator[dict[str, Any]]:
        """The events of one watch request (ends when the server closes it)."""
        query = {
            **params,
            "watch": "true",
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
        }
        timeout = httpx.Timeout(30.0, read=timeout_seconds + 30.0)
        async with self._client.stream("GET", path, params=query, timeout=timeout) as response:
            if not response.is_success:
                await response.aread()
                raise _error(response)
            async for line in response.aiter_lines():
                if line.strip():
                    yield json.loads(line)
