"""Nodes of a multi-node job: each node's place and static rendezvous, the network interface gloo uses, and
which mesh axes stay inside a node."""

from __future__ import annotations

import fcntl
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from plait.errors import PlaitError

LOOPBACK = "127.0.0.1"
TORCHRUN_PORT = 29500  # torchrun's default rendezvous port, used across nodes when --master-port is not given
SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


@dataclass(frozen=True, kw_only=True)
class NodeSpec:
    """This node's place in the job and its static rendezvous: node ``node_rank`` of ``nnodes``, rank 0 at
    ``master_addr:master_port`` (port 0: a free port here, one node only), gloo on interface ``ifname``."""

    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = LOOPBACK
    master_port: int = 0
    ifname: str = "lo"

    def global_rank(self, local_rank: int, nproc: int) -> int:
        """The job-wide rank of this node's ``local_rank``: node k holds k*nproc ... k*nproc+nproc-1."""
        return self.node_rank * nproc + local_rank

    def where(self) -> str:
        """`` of node K`` in a multi-node job, else empty (for messages)."""
        return f" of node {self.node_rank}" if self.nnodes > 1 else ""


SINGLE_NODE = NodeSpec()


def node_spec(
    *,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str | None = None,
    master_port: int | None = None,
    ifname: str | None = None,
) -> NodeSpec:
    """Check torchrun's multi-node options and fill in the rest: port 29500 across nodes (a free one on a
    single node), gloo on the interface that carries the master address (``lo`` on a single node)."""
    if nnodes < 1:
        raise PlaitError(f"--nnodes must be at least 1, got {nnodes}")
    if not 0 <= node_rank < nnodes:
        raise PlaitError(f"--node-rank {node_rank} is out of range for --nnodes {nnodes}: give 0 ... {nnodes - 1}")
    if nnodes > 1 and not master_addr:
        raise PlaitError(f"--nnodes {nnodes} needs --master-addr: the address of node 0 that every node can reach")
    if master_port is not None and not 0 < master_port < 65536:
        raise PlaitError(f"--master-port must be a TCP port (1 ... 65535), got {master_port}")
    if ifname is not None:
        _check_interface(ifname)
    if not master_addr:
        return NodeSpec(master_port=master_port or 0, ifname=ifname or "lo")
    addr = _resolve(master_addr)
    port = master_port or (TORCHRUN_PORT if nnodes > 1 else 0)
    return NodeSpec(nnodes=nnodes, node_rank=node_rank, master_addr=addr, master_port=port,
                    ifname=ifname or interface_to(addr))


def _check_interface(name: str) -> None:
    try:
        socket.if_nametoindex(name)
    except OSError:
        raise PlaitError(f"--ifname {name}: this machine has no network interface of that name (see `ip link`)") from None


def _resolve(host: str) -> str:
    """``host``'s IPv4 address (gloo and the rendezvous use IPv4 here)."""
    try:
        return str(socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0])
    except (OSError, IndexError) as exc:
        raise PlaitError(f"cannot resolve --master-addr {host} to an IPv4 address ({exc}); give node 0's IP address") from None


def interface_to(addr: str) -> str:
    """The network interface through which this machine reaches ``addr`` (the one holding it, if it is local)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((addr, TORCHRUN_PORT))  # UDP: sends nothing, only asks the kernel for a route
        except OSError as exc:
            raise PlaitError(f"this machine has no route to --master-addr {addr} ({exc.strerror}); "
                             "check the address, or give --ifname") from None
        source = str(probe.getsockname()[0])
    for _, name in socket.if_nameindex():
        if _ipv4_of(name) == source:
            return name
    raise PlaitError(f"no network interface holds {source}, the address this machine reaches {addr} from; give --ifname")


def _ipv4_of(name: str) -> str | None:
    """The (primary) IPv4 address of interface ``name``, None if it has none."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            packed = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
    except OSError:
        return None
    return socket.inet_ntoa(packed[20:24])


def mesh_on_nodes(shape: Sequence[int], axes: Sequence[str], nproc: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split a mesh's axes into those whose groups stay inside one node of ``nproc`` ranks and those whose
    groups span nodes; ranks fill the mesh row-major, so inner axes whose sizes multiply to a divisor of
    ``nproc`` stay inside a node."""
    inside: list[str] = []
    across: list[str] = []
    span = 1
    for size, axis in reversed(list(zip(shape, axes, strict=True))):
        span *= size
        (inside if size == 1 or nproc % span == 0 else across).append(axis)
    return tuple(reversed(inside)), tuple(reversed(across))
