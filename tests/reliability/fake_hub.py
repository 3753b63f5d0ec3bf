"""A loopback stand-in for the Hugging Face Hub that refuses every request and records its headers."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class FakeHub(http.server.ThreadingHTTPServer):
    """Answers every request with `status` and the hub's `X-Error-Code` (the hub's default, 401
    RepoNotFound, is what a private repository gets); keeps each request's Authorization header."""

    def __init__(self, status: int = 401, error_code: str | None = "RepoNotFound") -> None:
        self.authorizations: list[str] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _deny(self) -> None:
                hub.authorizations.append(self.headers.get("authorization", ""))
                body = json.dumps({"error": f"refused ({status})"}).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                if error_code:
                    self.send_header("x-error-code", error_code)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_HEAD = do_POST = _deny

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@contextmanager
def serving(hub: FakeHub) -> Iterator[FakeHub]:
    """Serve `hub` on a thread until the block ends."""
    thread = threading.Thread(target=hub.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        hub.shutdown()
        hub.server_close()
