"""Hosts for tests: Linux network namespaces on one private /24, joined by a bridge.

    with private_network(["a", "b", "c"]) as net:  # NamespacesUnavailable where not permitted
        net.address["a"]    # "10.213.7.2": host a's address
        net.gateway         # "10.213.7.1": this process's address, on the bridge (reaches all)
        net.run_on("a")     # ("ip", "netns", "exec", "<namespace>"): prefix a command to run on a
        net.crash("b")      # SIGKILL every process on host b: the machine dies, not one program

Each host is a namespace with its own loopback, ports and routes, and one veth whose other end
is on the bridge in the root namespace; so processes on two hosts talk over TCP between
addresses, as on two machines, and may listen on the same port. Everything is removed on exit,
even on failure: the hosts' processes killed, the namespaces deleted (their veths go with them),
the bridge deleted. Names carry the test process's pid, so parallel runs do not meet, and what a
killed run left behind is removed by the next one.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

_NAME = re.compile(r"^mh(\d+)(br|[a-z])$")  # interface and namespace names stay under 16 bytes


class NamespacesUnavailable(Exception):
    """Network namespaces cannot be made here (not root, no `ip`, a container without the
    capability); the message says why, for a skip."""


def _ip(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *arguments], capture_output=True, text=True, timeout=30)


def _checked(*arguments: str) -> None:
    done = _ip(*arguments)
    if done.returncode:
        raise RuntimeError(f"ip {' '.join(arguments)}: {done.stderr.strip()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_all_in(namespace: str) -> None:
    """SIGKILL every process in the namespace until none is left (one may fork as we go)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pids = [int(pid) for pid in _ip("netns", "pids", namespace).stdout.split()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def _remove_leftovers() -> None:
    """Namespaces and bridges of runs whose process is gone (killed before its cleanup)."""
    for line in _ip("netns", "list").stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if (match := _NAME.match(name)) and not _pid_alive(int(match[1])):
            _kill_all_in(name)
            _ip("netns", "del", name)
    for line in _ip("-o", "link", "show").stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if (match := _NAME.match(name)) and not _pid_alive(int(match[1])):
            _ip("link", "del", name)


def _free_subnet() -> str:
    """A 10.x.y.0/24 that no route of this machine covers yet."""
    routes = _ip("-4", "route", "show", "table", "all").stdout
    for _ in range(100):
        prefix = f"10.{random.randint(200, 254)}.{random.randint(0, 255)}"
        if f"{prefix}." not in routes:
            return prefix
    raise NamespacesUnavailable("no free 10.x.y.0/24 for the test network")


@dataclass
class PrivateNetwork:
    tag: str
    gateway: str
    subnet: str
    address: dict[str, str] = field(default_factory=dict)

    def namespace(self, host: str) -> str:
        return f"{self.tag}{host}"

    def run_on(self, host: str) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.namespace(host))

    def crash(self, host: str) -> None:
        """SIGKILL every process on the host at once: nothing on it gets to clean up."""
        _kill_all_in(self.namespace(host))


def check_namespaces_allowed() -> None:
    """Raise NamespacesUnavailable, saying why, unless `ip netns add` works for this user."""
    if shutil.which("ip") is None:
        raise NamespacesUnavailable("the `ip` command (iproute2) is not installed")
    probe = f"mh{os.getpid()}z"
    done = _ip("netns", "add", probe)
    if done.returncode:
        raise NamespacesUnavailable(f"`ip netns add` is refused: {done.stderr.strip()}")
    _ip("netns", "del", probe)


@contextlib.contextmanager
def private_network(hosts: Sequence[str]) -> Iterator[PrivateNetwork]:
    """Make the hosts (one letter each), yield the network, and remove it all afterwards."""
    check_namespaces_allowed()
    _remove_leftovers()
    tag = f"mh{os.getpid()}"
    prefix = _free_subnet()
    net = PrivateNetwork(tag=tag, gateway=f"{prefix}.1", subnet=f"{prefix}.0/24")
    bridge = f"{tag}br"
    try:
        _checked("link", "add", bridge, "type", "bridge")
        _checked("addr", "add", f"{net.gateway}/24", "dev", bridge)
        _checked("link", "set", bridge, "up")
        for number, host in enumerate(hosts, start=2):
            namespace = net.namespace(host)
            _checked("netns", "add", namespace)
            # The veth's root end is named like the namespace (another namespace of names).
            _checked("link", "add", namespace, "type", "veth", "peer", "eth0", "netns", namespace)
            _checked("link", "set", namespace, "master", bridge, "up")
            address = f"{prefix}.{number}"
            _checked("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
            _checked("-n", namespace, "link", "set", "eth0", "up")
            _checked("-n", namespace, "link", "set", "lo", "up")
            net.address[host] = address
        yield net
    finally:
        for host in hosts:
            namespace = net.namespace(host)
            if _ip("netns", "pids", namespace).returncode == 0:
                _kill_all_in(namespace)
                # Its veth goes now: a namespace outlives `netns del` while a socket of its
                # (closing towards a dead peer) still holds it, and its veth with it.
                _ip("link", "del", namespace)
                _ip("netns", "del", namespace)
        _ip("link", "del", bridge)
