"""Is a host or client address this machine's loopback? (The API and the model server serve
non-loopback clients only with a secret configured.)"""

from __future__ import annotations

import ipaddress


def is_ip(host: str | None) -> bool:
    try:
        ipaddress.ip_address((host or "").split("%")[0])
        return True
    except ValueError:
        return False


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def remote_connection(local: str | None, peer: str | None) -> bool:
    """True when a connection arrived on, or came from, a non-loopback address. Only real sockets
    carry IP addresses; in-process transports (a test client) cannot be remote."""
    return any(is_ip(a) and not is_loopback(a) for a in (local, peer))
