"""An emulated multi-node cluster on one machine: each "node" is a network namespace, the nodes hang on one
bridge (a "switch" that lives in a namespace of its own), and each node's link can be shaped with
``tc qdisc ... tbf`` in both directions, so a test or benchmark sees a two-level network: loopback inside a
node, the shaped link between nodes.

Nothing is added to the host's namespace: every interface is created directly inside its namespace, so the
nodes reach each other and nothing else (no route leads to the host's addresses, and the host has no
interface on the nodes' subnet). Needs root, ``ip`` and (to shape) ``tc`` from iproute2; where the machine
does not allow that, ``emulated_cluster`` raises ``NamespacesUnavailable`` with the reason (tests skip).

Every namespace is named ``plaitemu<pid>x<n>...``: ``emulated_cluster`` removes what it created on exit,
also after an exception, and ``remove_leftovers()`` removes those of processes that died without cleaning up.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from plait.errors import PlaitError
from plait.runtime.procs import pid_alive

PREFIX = "plaitemu"  # every namespace this module creates starts with it, then the creator's pid
DEFAULT_SUBNET = "10.78.0.0/24"
NODE_IF, BRIDGE = "eth0", "br0"  # names inside the namespaces (never in the host's)
COMMAND_TIMEOUT_S = 30.0
STOP_GRACE_S = 2.0
_UNSUPPORTED = re.compile(r"not permitted|permission denied|not supported|unknown|no such file|cannot open", re.I)
_LEFTOVER = re.compile(rf"^{PREFIX}(\d+)x")
_serial = itertools.count()


class NetnsError(PlaitError):
    """Setting up or tearing down the emulated cluster failed (the message names the command)."""


class NamespacesUnavailable(NetnsError):
    """This machine does not allow the emulated cluster (not root, no iproute2, no namespaces or tbf)."""


@dataclass(frozen=True, kw_only=True)
class LinkShape:
    """A token-bucket limit (``tc qdisc tbf``) on each node's link, applied in both directions."""

    rate_bits: float  # bits per second, as tbf counts them (Ethernet frames, headers included)
    burst_bytes: int | None = None  # bucket size; default: 1 ms of the rate, at least 32 KiB
    latency_s: float = 0.02  # the longest a packet may wait in the queue before tbf drops it

    @classmethod
    def gbit(cls, gbit_per_s: float, **kwargs: Any) -> LinkShape:
        """A shape of ``gbit_per_s`` Gbit/s."""
        return cls(rate_bits=gbit_per_s * 1e9, **kwargs)

    @property
    def bytes_per_s(self) -> float:
        """The rate in bytes per second."""
        return self.rate_bits / 8

    @property
    def burst(self) -> int:
        """The bucket size in bytes."""
        return self.burst_bytes if self.burst_bytes is not None else max(32 * 1024, int(self.bytes_per_s * 1e-3))

    def tbf_args(self) -> list[str]:
        """The ``tc qdisc add ... tbf`` parameters."""
        return ["rate", f"{int(self.rate_bits)}bit", "burst", str(self.burst), "latency", f"{int(self.latency_s * 1e6)}us"]

    def describe(self) -> str:
        """``1 Gbit/s (burst 125000 B)``, for messages."""
        return f"{self.rate_bits / 1e9:g} Gbit/s (burst {self.burst} B)"


@dataclass(frozen=True, kw_only=True)
class EmuNode:
    """One emulated node: its namespace, its link's name and address there, and the switch port it plugs into."""

    index: int
    namespace: str
    ifname: str
    addr: str
    port: str  # the other end of the node's link, on the bridge in the switch namespace

    def prefix(self) -> list[str]:
        """The command prefix that runs a program inside this node (``ip netns exec NS``)."""
        return ["ip", "netns", "exec", self.namespace]

    def run(self, argv: Sequence[str], *, timeout: float = 60.0, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside this node and wait for it; output captured as text (never raises on failure)."""
        return subprocess.run([*self.prefix(), *argv], capture_output=True, text=True, timeout=timeout, check=False,
                              **kwargs)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside this node; ``emulated_cluster`` stops it on exit if it still runs."""
        return subprocess.Popen([*self.prefix(), *argv], **kwargs)


@dataclass(frozen=True, kw_only=True)
class EmulatedCluster:
    """The nodes of an open ``emulated_cluster``, with every namespace, link and qdisc it created."""

    tag: str  # the unique prefix of its namespaces
    nodes: tuple[EmuNode, ...]
    switch: str  # the namespace holding the bridge
    subnet: ipaddress.IPv4Network
    shape: LinkShape | None
    namespaces: tuple[str, ...]
    links: tuple[tuple[str, str], ...]  # (namespace, device)
    qdiscs: tuple[tuple[str, str], ...]  # (namespace, device) with a root tbf

    @property
    def master_addr(self) -> str:
        """Node 0's address: the rendezvous every node can reach."""
        return self.nodes[0].addr


@dataclass
class _Made:
    """What has been created so far (teardown removes exactly this, newest first)."""

    namespaces: list[str] = field(default_factory=list)
    links: list[tuple[str, str]] = field(default_factory=list)
    qdiscs: list[tuple[str, str]] = field(default_factory=list)


# ---- commands ------------------------------------------------------------------------------------------


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)


def _must(argv: Sequence[str], *, probing: str = "") -> None:
    """Run a setup command; a failure raises ``NamespacesUnavailable`` when ``probing`` names a kernel
    feature and the error says it is missing or forbidden, else ``NetnsError``."""
    done = _run(argv)
    if done.returncode == 0:
        return
    why = f"`{' '.join(argv)}`: {done.stderr.strip() or f'exit code {done.returncode}'}"
    if probing and _UNSUPPORTED.search(done.stderr):
        raise NamespacesUnavailable(f"cannot {probing} on this machine ({why})")
    raise NetnsError(f"setting up the emulated cluster failed ({why})")


def check_available(*, shaping: bool = False) -> None:
    """Raise ``NamespacesUnavailable`` saying why when this process cannot build an emulated cluster."""
    if not sys.platform.startswith("linux"):
        raise NamespacesUnavailable(f"network namespaces are Linux only (this is {sys.platform})")
    if os.geteuid() != 0:
        raise NamespacesUnavailable(f"network namespaces need root (this process runs as uid {os.geteuid()})")
    if shutil.which("ip") is None:
        raise NamespacesUnavailable("the `ip` command (iproute2) is not installed")
    if shaping and shutil.which("tc") is None:
        raise NamespacesUnavailable("the `tc` command (iproute2) is not installed: cannot shape links")


def list_namespaces(prefix: str = PREFIX) -> list[str]:
    """Named network namespaces whose name starts with ``prefix``."""
    done = _run(["ip", "netns", "list"])
    names = [line.split()[0] for line in done.stdout.splitlines() if line.strip()]
    return sorted(n for n in names if n.startswith(prefix))


# ---- building ------------------------------------------------------------------------------------------


def _add_namespace(name: str, made: _Made) -> None:
    _must(["ip", "netns", "add", name], probing="create network namespaces")
    made.namespaces.append(name)
    _must(["ip", "-n", name, "link", "set", "lo", "up"])


def _add_switch(name: str, made: _Made) -> None:
    _add_namespace(name, made)
    _must(["ip", "-n", name, "link", "add", BRIDGE, "type", "bridge", "forward_delay", "0"], probing="create a bridge")
    made.links.append((name, BRIDGE))
    _must(["ip", "-n", name, "link", "set", BRIDGE, "up"])


def _add_node(node: EmuNode, switch: str, prefixlen: int, made: _Made) -> None:
    """The node's namespace and its link to the switch, created inside the two namespaces, up and addressed."""
    _add_namespace(node.namespace, made)
    _must(["ip", "link", "add", "name", node.ifname, "netns", node.namespace, "type", "veth", "peer", "name",
           node.port, "netns", switch], probing="create veth links")
    made.links.append((switch, node.port))
    _must(["ip", "-n", switch, "link", "set", node.port, "master", BRIDGE])
    _must(["ip", "-n", switch, "link", "set", node.port, "up"])
    _must(["ip", "-n", node.namespace, "addr", "add", f"{node.addr}/{prefixlen}", "dev", node.ifname])
    _must(["ip", "-n", node.namespace, "link", "set", node.ifname, "up"])


def _shape(namespace: str, device: str, shape: LinkShape, made: _Made) -> None:
    _must(["tc", "-n", namespace, "qdisc", "add", "dev", device, "root", "tbf", *shape.tbf_args()],
          probing="shape links with tc tbf")
    made.qdiscs.append((namespace, device))


def _plan_nodes(tag: str, num_nodes: int, subnet: ipaddress.IPv4Network) -> tuple[EmuNode, ...]:
    hosts = itertools.islice(subnet.hosts(), num_nodes)
    nodes = tuple(EmuNode(index=k, namespace=f"{tag}n{k}", ifname=NODE_IF, addr=str(addr), port=f"port{k}")
                  for k, addr in enumerate(hosts))
    if len(nodes) < num_nodes:
        raise NetnsError(f"subnet {subnet} has room for {len(nodes)} nodes, not {num_nodes}; give a larger subnet")
    return nodes


def _build(tag: str, num_nodes: int, subnet: ipaddress.IPv4Network, shape: LinkShape | None, made: _Made) -> EmulatedCluster:
    switch = f"{tag}sw"
    nodes = _plan_nodes(tag, num_nodes, subnet)
    _add_switch(switch, made)
    for node in nodes:
        _add_node(node, switch, subnet.prefixlen, made)
        if shape is not None:
            _shape(node.namespace, node.ifname, shape, made)  # node -> switch
            _shape(switch, node.port, shape, made)  # switch -> node
    return EmulatedCluster(tag=tag, nodes=nodes, switch=switch, subnet=subnet, shape=shape,
                           namespaces=tuple(made.namespaces), links=tuple(made.links), qdiscs=tuple(made.qdiscs))


# ---- tearing down --------------------------------------------------------------------------------------


def _pids_in(namespace: str) -> list[int]:
    done = _run(["ip", "netns", "pids", namespace])
    return [int(p) for p in done.stdout.split() if p.isdigit()]


def _stop_processes(namespaces: Sequence[str]) -> None:
    """SIGTERM the processes still running inside our namespaces (a test's stray ranks), SIGKILL after a grace."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [pid for ns in namespaces for pid in _pids_in(ns)]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline and any(_pids_in(ns) for ns in namespaces):
            time.sleep(0.05)


def _teardown(made: _Made) -> list[str]:
    """Remove what ``made`` records, newest first, whatever fails on the way; the namespaces still left."""
    _stop_processes(made.namespaces)
    for ns, dev in reversed(made.qdiscs):
        _run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"])
    for ns, dev in reversed(made.links):
        _run(["ip", "-n", ns, "link", "del", dev])  # a veth's peer goes with it
    for ns in reversed(made.namespaces):
        _run(["ip", "netns", "del", ns])
    left = set(list_namespaces(""))
    return [ns for ns in made.namespaces if ns in left]


def remove_leftovers(prefix: str = PREFIX) -> list[str]:
    """Delete namespaces named ``prefix<pid>x...`` whose creating process is gone (or, for any other
    ``prefix``, every namespace starting with it); the names removed."""
    removed = []
    for ns in list_namespaces(prefix):
        found = _LEFTOVER.match(ns)
        if found and pid_alive(int(found.group(1))):
            continue
        _stop_processes([ns])
        _run(["ip", "netns", "del", ns])  # its links and qdiscs go with it
        removed.append(ns)
    return removed


def unique_tag() -> str:
    """A namespace prefix no other emulated cluster uses: ``plaitemu<pid>x<n>``."""
    return f"{PREFIX}{os.getpid()}x{next(_serial)}"


@contextlib.contextmanager
def emulated_cluster(
    num_nodes: int = 2,
    *,
    shape: LinkShape | None = None,
    subnet: str = DEFAULT_SUBNET,
    tag: str | None = None,
) -> Iterator[EmulatedCluster]:
    """``num_nodes`` network namespaces on one bridge, addresses 1, 2, ... of ``subnet``, each node's link
    shaped by ``shape`` both ways (None: unshaped); everything is removed on exit, also after an exception."""
    if num_nodes < 1:
        raise NetnsError(f"an emulated cluster needs at least one node, got {num_nodes}")
    check_available(shaping=shape is not None)
    made = _Made()
    failed = False
    try:
        yield _build(tag or unique_tag(), num_nodes, ipaddress.IPv4Network(subnet), shape, made)
    except BaseException as exc:
        failed = True
        left = _teardown(made)
        if left:
            exc.add_note(f"emulated cluster: namespaces left behind: {', '.join(left)}")
        raise
    finally:
        if not failed:
            left = _teardown(made)
            if left:
                raise NetnsError(f"could not remove network namespaces {', '.join(left)}; remove them with "
                                 "`ip netns del NAME` or plait.testing.netns.remove_leftovers()")


# ---- measuring -----------------------------------------------------------------------------------------

_RECEIVER = """
import socket, sys, time
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
conn, _ = srv.accept()
want, got, first, buf = int(sys.argv[3]), 0, 0, bytearray(1 << 20)
while got < want:
    n = conn.recv_into(buf)
    if not n:
        break
    if got == 0:
        first, start = n, time.perf_counter()
    got += n
print(got - first, time.perf_counter() - start, flush=True)
"""

_SENDER = """
import socket, sys
chunk, left = bytes(1 << 20), int(sys.argv[3])
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60) as s:
    while left > 0:
        s.sendall(chunk[:min(left, len(chunk))])
        left -= len(chunk)
"""


def tcp_throughput(sender: EmuNode, receiver: EmuNode, nbytes: int = 32 * 2**20, *, port: int = 5201,
                   timeout_s: float = 120.0) -> float:
    """Bytes per second of one TCP stream of ``nbytes`` from ``sender`` to ``receiver`` (payload only, timed
    by the receiver from its first byte to its last)."""
    argv = [sys.executable, "-c"]
    recv = receiver.popen([*argv, _RECEIVER, receiver.addr, str(port), str(nbytes)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    try:
        assert recv.stdout is not None
        if recv.stdout.readline().strip() != "ready":
            raise NetnsError(f"the TCP receiver in {receiver.namespace} did not start: {recv.communicate()[1][-2000:]}")
        sent = sender.run([*argv, _SENDER, receiver.addr, str(port), str(nbytes)], timeout=timeout_s)
        if sent.returncode != 0:
            raise NetnsError(f"the TCP sender in {sender.namespace} failed: {sent.stderr[-2000:]}")
        out, err = recv.communicate(timeout=timeout_s)
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
    fields = out.split()
    if recv.returncode != 0 or len(fields) != 2 or not float(fields[1]) > 0:
        raise NetnsError(f"the TCP receiver in {receiver.namespace} failed: {err[-2000:] or out}")
    return int(fields[0]) / float(fields[1])
