"""Where a webhook may be delivered: a URL is resolved once, every address it resolves to must be
public, and the delivery connects to the address that was checked (pinned), so a name cannot
resolve to a public address for the check and to an internal one for the request (DNS
rebinding). Fails closed: a name that does not resolve is refused, not waved through.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from django.conf import settings


def _system_resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


# The one resolver deliveries and registrations use (tests put a stub resolver here).
resolve: Callable[[str, int], list[str]] = _system_resolve


class TargetRefused(Exception):
    """The URL may not be delivered to; `reason` says why in a line a tenant may read."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Target:
    """A checked destination: `url` names the checked address instead of the host, `host` is
    what the request says it is for (the Host header, and the TLS server name)."""

    url: str
    host: str
    host_header: str
    address: str


def is_public(address: str) -> bool:
    """Whether the address is globally routable: not private, loopback, link-local, shared
    (100.64/10), reserved, multicast or unspecified, also when written as IPv4 inside IPv6."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None and not is_public(str(embedded)):
            return False
    return ip.is_global and not ip.is_multicast


def target_resolve(url: str) -> Target:
    """Check the URL and resolve its host once; raises TargetRefused. Only ports 80 and 443 (or
    WEBHOOK_ALLOWED_PORTS); WEBHOOK_ALLOW_PRIVATE_TARGETS lifts the address and port rules for
    receivers inside one's own network (and the tests')."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TargetRefused("Use an http or https URL with a host.")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise TargetRefused("The URL's port is not a number from 1 to 65535.") from None
    open_network = settings.WEBHOOK_ALLOW_PRIVATE_TARGETS
    if not open_network and port not in settings.WEBHOOK_ALLOWED_PORTS:
        allowed = ", ".join(str(p) for p in settings.WEBHOOK_ALLOWED_PORTS)
        raise TargetRefused(f"Port {port} is not allowed (allowed: {allowed}).")
    try:
        addresses = resolve(parts.hostname, port)
    except (OSError, UnicodeError):
        addresses = []
    if not addresses:
        raise TargetRefused(f"The host {parts.hostname} does not resolve.")
    if not open_network and not all(is_public(address) for address in addresses):
        raise TargetRefused("Private, loopback and other non-public addresses are not allowed.")
    address = addresses[0]
    netloc = f"[{address}]" if ":" in address else address
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    host_header = host if parts.port is None else f"{host}:{parts.port}"
    pinned = urlunsplit((parts.scheme, f"{netloc}:{port}", parts.path, parts.query, ""))
    return Target(url=pinned, host=parts.hostname, host_header=host_header, address=address)
