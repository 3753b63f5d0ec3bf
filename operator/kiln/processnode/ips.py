"""Pod IPs on the process node: one local address per pod, unique across every agent on this host.

The API server refuses loopback addresses (127.0.0.0/8) as Service endpoints, so a pod with a
127.0.0.N address can never be reached through a Service. When it can, the agent makes a block of
the pod CIDR local (`ip route add local 10.244.255.0/24 dev lo`, Linux's "AnyIP": any address of
the block can be bound and reached on this host, like 127.0.0.0/8) and hands out addresses from
there; without CAP_NET_ADMIN it falls back to 127.0.0.N (pods run and are reachable by their IP,
but Services list no endpoints for them). Each address is held by an flock on a file in a
host-wide folder, so two agents (two test sessions) never hand out the same one, and a crashed
agent's addresses free themselves.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROUTABLE_RANGE = "10.244.255.0/24"  # a block of the local cluster's pod CIDR (10.244.0.0/16)
LOOPBACK_RANGE = "127.0.0.0/24"
FIRST_HOST = 10  # .1-.9 stay free for whatever else uses the block
LOCK_DIR = Path(tempfile.gettempdir()) / "kiln-process-node-ips"


def candidates(cidr: str, first_host: int = FIRST_HOST) -> Iterator[str]:
    """Addresses of `cidr` a pod may get, in order (host part >= first_host, no broadcast)."""
    network = ipaddress.ip_network(cidr)
    for index, address in enumerate(network.hosts(), start=1):
        if index >= first_host:
            yield str(address)


def is_local(address: str) -> bool:
    """Whether this host can bind `address` (a plain bind, so only truly local addresses pass)."""
    if Path("/proc/sys/net/ipv4/ip_nonlocal_bind").is_file() and (
        Path("/proc/sys/net/ipv4/ip_nonlocal_bind").read_text().strip() != "0"
    ):
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((address, 0))
        except OSError:
            return False
    return True


def make_local(cidr: str) -> bool:
    """Route `cidr` to the loopback device (needs CAP_NET_ADMIN); True when it is local afterwards."""
    probe = next(candidates(cidr))
    if is_local(probe):
        return True
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(
            ["ip", "route", "add", "local", cidr, "dev", "lo"], capture_output=True, timeout=10, check=False
        )
    return is_local(probe)


def choose_range(requested: str | None) -> tuple[str, bool]:
    """The pod range to use and whether Services can reach it (False for the loopback fallback)."""
    if requested:
        network = ipaddress.ip_network(requested)
        return requested, not network.is_loopback and make_local(requested)
    if make_local(ROUTABLE_RANGE):
        return ROUTABLE_RANGE, True
    return LOOPBACK_RANGE, False


class IpPool:
    """Hands out the addresses of one range, each held by an flock until released."""

    def __init__(self, cidr: str, lock_dir: Path = LOCK_DIR) -> None:
        self.cidr = cidr
        self.lock_dir = lock_dir
        self._held: dict[str, int] = {}

    def acquire(self, preferred: str | None = None) -> str:
        """A free address (`preferred` when it is free: a restarted agent keeps a pod's IP)."""
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            self.lock_dir.chmod(0o1777)
        order = list(candidates(self.cidr))
        if preferred in order:
            order.remove(preferred)
            order.insert(0, preferred)
        for address in order:
            if address in self._held:
                continue
            fd = os.open(self.lock_dir / f"{address}.lock", os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            self._held[address] = fd
            return address
        raise RuntimeError(f"no free pod IP left in {self.cidr}")

    def release(self, address: str) -> None:
        fd = self._held.pop(address, None)
        if fd is not None:
            os.close(fd)

    def release_all(self) -> None:
        for address in list(self._held):
            self.release(address)
