"""Which TCP ports a set of processes listens on, and which of them face the network.

An embedded Ray must be reachable from this machine only: anyone who can reach its GCS,
raylet or a worker's gRPC port can run code as the user (Ray has no per-call
authorization). The listener test reads the sockets here, and anything else that must
say "nothing public" should too, so it is one definition.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class Listener:
    """A listening TCP socket and the process holding it."""

    pid: int
    process: str
    ip: str
    port: int

    def __str__(self) -> str:
        return f"{self.process}[{self.pid}] on {self.ip}:{self.port}"


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8 and ::1 (and ::ffff:127.x); the wildcard 0.0.0.0 / :: is not loopback,
    it is every interface."""
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def process_tree(root: int) -> set[int]:
    """``root`` and every process below it that is still alive."""
    try:
        parent = psutil.Process(root)
    except psutil.NoSuchProcess:
        return set()
    return {root, *(child.pid for child in parent.children(recursive=True))}


def listeners(pids: Iterable[int]) -> list[Listener]:
    """The listening TCP sockets (v4 and v6) held by ``pids``; processes that have
    exited in the meantime are skipped."""
    found = []
    for pid in sorted(set(pids)):
        try:
            process = psutil.Process(pid)
            name = process.name()
            sockets = process.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        found.extend(
            Listener(pid, name, s.laddr.ip, s.laddr.port)
            for s in sockets
            if s.status == psutil.CONN_LISTEN
        )
    return sorted(found, key=lambda item: (item.pid, item.port, item.ip))


def public_listeners(pids: Iterable[int]) -> list[Listener]:
    """The listeners of ``pids`` that another machine could reach: any address that is
    not loopback, wildcards included."""
    return [item for item in listeners(pids) if not is_loopback(item.ip)]
