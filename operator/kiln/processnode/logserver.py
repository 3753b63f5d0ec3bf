"""The kubelet's log endpoint over HTTPS, so `kubectl logs` works through the API server.

Serves `GET /containerLogs/{namespace}/{pod}/{container}` (query: tailLines, limitBytes, follow)
from `<state>/pods/<ns>_<pod>/<container>.log`, with a self-signed certificate (the local API server
has no kubelet CA, so it does not verify kubelets). A deliberately small HTTP/1.1 server on asyncio
streams: one request per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

log = logging.getLogger("kiln.processnode")

FOLLOW_POLL_SECONDS = 0.2


def self_signed(cert_path: Path, key_path: Path, host: str = "127.0.0.1") -> None:
    """Write a self-signed serving certificate for `host` unless one exists."""
    if cert_path.exists() and key_path.exists():
        return
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kiln-process-node")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(host))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def select_log(data: bytes, tail_lines: int | None, limit_bytes: int | None) -> bytes:
    """The part of a log a request asks for: the last `tail_lines` lines, at most `limit_bytes`."""
    if tail_lines is not None:
        lines = data.splitlines(keepends=True)
        data = b"".join(lines[-tail_lines:]) if tail_lines > 0 else b""
    if limit_bytes is not None:
        data = data[:limit_bytes]
    return data


def runs_path(log_path: Path) -> Path:
    """The file listing where each run of a container starts in its log (one byte offset a line)."""
    return log_path.with_name(log_path.name + ".runs")


def run_slice(size: int, starts: list[int], previous: bool) -> tuple[int, int] | None:
    """(begin, end) of the current run's (or, `previous`, the run before's) part of a log of `size` bytes.

    None when there is no previous run.
    """
    starts = [s for s in starts if 0 <= s <= size]
    if not starts:
        return None if previous else (0, size)
    if previous:
        return (starts[-2], starts[-1]) if len(starts) >= 2 else None
    return starts[-1], size


def parse_log_path(path: str) -> tuple[str, str, str] | None:
    """(namespace, pod, container) of a `/containerLogs/...` path."""
    parts = [unquote(p) for p in path.strip("/").split("/")]
    if len(parts) == 4 and parts[0] == "containerLogs" and all(parts[1:]):
        return parts[1], parts[2], parts[3]
    return None


class LogServer:
    """`/containerLogs` and `/healthz` on 127.0.0.1:`port` over TLS."""

    def __init__(
        self,
        state_dir: Path,
        port: int = 0,
        running: Callable[[str, str, str], bool] | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.port = port
        self.running = running or (lambda namespace, pod, container: True)
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        cert, key = self.state_dir / "kubelet.crt", self.state_dir / "kubelet.key"
        self_signed(cert, key)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(cert), str(key))
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, ssl=context)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
            method, target, _ = request.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            url = urlsplit(target)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            if method != "GET":
                await self._reply(writer, 405, b"method not allowed\n")
            elif url.path == "/healthz":
                await self._reply(writer, 200, b"ok")
            elif (where := parse_log_path(url.path)) is not None:
                await self._logs(writer, where, query)
            else:
                await self._reply(writer, 404, b"404 page not found\n")
        except (OSError, ValueError, asyncio.IncompleteReadError, TimeoutError, ssl.SSLError) as error:
            log.debug("log endpoint: %s", error)
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()

    async def _reply(self, writer: asyncio.StreamWriter, code: int, body: bytes) -> None:
        reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 400: "Bad Request"}.get(code, "")
        writer.write(
            f"HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()

    async def _logs(
        self, writer: asyncio.StreamWriter, where: tuple[str, str, str], query: dict[str, str]
    ) -> None:
        namespace, pod, container = where
        path = self.state_dir / "pods" / f"{namespace}_{pod}" / f"{container}.log"
        if not path.is_file():
            await self._reply(writer, 404, f'container "{container}" in pod "{pod}" has no log\n'.encode())
            return
        try:
            tail = int(query["tailLines"]) if "tailLines" in query else None
            limit = int(query["limitBytes"]) if "limitBytes" in query else None
        except ValueError:
            await self._reply(writer, 400, b"bad tailLines or limitBytes\n")
            return
        raw = path.read_bytes()
        try:
            starts = [int(line) for line in runs_path(path).read_text().split()]
        except (OSError, ValueError):
            starts = []
        previous = query.get("previous") in ("true", "1")
        span = run_slice(len(raw), starts, previous)
        if span is None:
            await self._reply(
                writer,
                400,
                f'previous terminated container "{container}" in pod "{pod}" not found\n'.encode(),
            )
            return
        data = select_log(raw[span[0] : span[1]], tail, limit)
        if previous or query.get("follow") not in ("true", "1"):
            await self._reply(writer, 200, data)
            return
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n"
        )
        offset = len(raw)
        await self._chunk(writer, data)
        while self.running(namespace, pod, container) and path.exists():
            await asyncio.sleep(FOLLOW_POLL_SECONDS)
            with path.open("rb") as handle:
                handle.seek(offset)
                more = handle.read()
            offset += len(more)
            if more:
                await self._chunk(writer, more)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def _chunk(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        if data:
            writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            await writer.drain()
