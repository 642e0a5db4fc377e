"""Multi-node launch: `plait run` on 2 "nodes" of 2 ranks each trains like one process.

Each node is its own `plait run --nnodes 2 --node-rank K --master-addr ADDR --master-port PORT` launcher:
two launchers on loopback (runs everywhere), and two launchers in network namespaces joined by a veth
pair (as root), where the rendezvous is node 0's namespace address and gloo uses the veth ends. The job is
the launcher tests' training script on an HSDP plan for a 2x2 mesh (dp_shard inside a node, dp_replicate
across nodes), compared with one plain process after 3 steps. A rank failing on one node stops both nodes,
and a frozen rank makes the others raise at the collective timeout instead of waiting for ever.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import torch
from runkit import PLAIT, SCRIPTS, none_alive, read_pids, reaping, wait_for, zoo_plan

from plait.cli.main import main
from plait.models import zoo_model
from plait.plan import save_plan
from plait.runtime import FINAL_FILE, TrainConfig, launch, read_metrics
from plait.runtime.launch import free_port
from plait.runtime.nodes import interface_to, mesh_on_nodes, node_spec

MODEL, GLOBAL_BATCH, STEPS, LR = "gpt-tiny", 8, 3, 1e-3
# parameters: measured <= 1.5e-6 on an Intel machine, 2.5e-6 on an AMD EPYC one (float32 sums in another order;
# Adam's step is lr = 1e-3 an element, so a synchronisation error shows far above this)
RTOL, ATOL, PARAM_ATOL = 1e-5, 1e-6, 5e-6
WAIT_S = 300.0  # the longest a launcher may take (a 4-rank run takes about 20 s on 2 idle cores)
NS_ADDRS = ("10.77.0.1", "10.77.0.2")

ENV_SCRIPT = """
import os
keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
        "MASTER_ADDR", "MASTER_PORT", "GLOO_SOCKET_IFNAME", "PLAIT_DIST_TIMEOUT_S"]
print(" ".join(f"{k}={os.environ.get(k)}" for k in keys))
"""


@cache
def reference() -> tuple[list[float], dict[str, torch.Tensor]]:
    """One plain process with the Trainer's optimizer settings: each step's loss and the final state."""
    zm, cfg = zoo_model(MODEL), TrainConfig(steps=STEPS, lr=LR)
    torch.manual_seed(cfg.seed)
    model = zm.build()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    losses = []
    for step in range(STEPS):
        opt.zero_grad()
        loss = zm.loss(model, zm.make_batch(GLOBAL_BATCH, generator=torch.Generator().manual_seed(1000 + step)))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HSDP on a (dp_replicate=2, dp_shard=2) mesh: each node holds one dp_shard group."""
    plan = zoo_plan(MODEL, "hybrid", world=4, global_batch=GLOBAL_BATCH, nodes=2)
    assert (plan.mesh.shape, plan.mesh.axes) == ((2, 2), ("dp_replicate", "dp_shard"))
    return save_plan(plan, tmp_path_factory.mktemp("multinode") / "plan.json")


# ---- launchers -------------------------------------------------------------------------------------------


@dataclass
class Node:
    """One node's `plait run`, its output in files (so neither launcher can block on a full pipe)."""

    rank: int
    proc: subprocess.Popen[bytes]
    out: Path
    err: Path
    ended_at: float | None = None

    def stdout(self) -> str:
        """What the launcher printed on stdout."""
        return self.out.read_text()

    def stderr(self) -> str:
        """What the launcher printed on stderr."""
        return self.err.read_text()

    def errors(self) -> list[str]:
        """The launcher's `error:` lines."""
        return [line for line in self.stderr().splitlines() if line.startswith("error:")]


def start_node(folder: Path, rank: int, args: Sequence[str], prefix: Sequence[str] = ()) -> Node:
    """Start node ``rank``'s `plait run ARGS` (behind ``prefix``, e.g. `ip netns exec NS`)."""
    out, err = folder / f"node{rank}.out", folder / f"node{rank}.err"
    with out.open("wb") as o, err.open("wb") as e:
        proc = subprocess.Popen([*prefix, *PLAIT, "run", *args], stdout=o, stderr=e, stdin=subprocess.DEVNULL)
    return Node(rank, proc, out, err)


def wait_nodes(nodes: Sequence[Node], timeout_s: float = WAIT_S) -> None:
    """Wait for every launcher to exit, noting when each did; fail naming the ones still running."""
    def wait(node: Node) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.proc.wait(timeout_s)
            node.ended_at = time.monotonic()

    waiters = [threading.Thread(target=wait, args=(node,), daemon=True) for node in nodes]
    for t in waiters:
        t.start()
    for t in waiters:
        t.join()
    stuck = [n for n in nodes if n.ended_at is None]
    assert not stuck, "\n".join(f"node {n.rank} still runs after {timeout_s} s:\n{n.stderr()[-3000:]}" for n in stuck)


def stop_node(node: Node) -> None:
    """Stop a launcher that still runs: SIGTERM (it stops its ranks), SIGKILL if it does not exit."""
    if node.proc.poll() is not None:
        return
    node.proc.send_signal(signal.SIGTERM)
    try:
        node.proc.wait(60)
    except subprocess.TimeoutExpired:
        node.proc.kill()
        node.proc.wait()


@contextlib.contextmanager
def two_nodes(folder: Path, args_of: Sequence[Sequence[str]], prefixes: Sequence[Sequence[str]] = ((), ())) -> Iterator[list[Node]]:
    """Node 1's launcher, then node 0's; on leaving, every launcher and rank is stopped (a failed test's too)."""
    pid_dir = folder / "pids"
    pid_dir.mkdir()
    nodes: list[Node] = []
    with reaping(pid_dir):
        try:
            for rank in (1, 0):
                nodes.append(start_node(folder, rank, args_of[rank], prefixes[rank]))
            yield sorted(nodes, key=lambda n: n.rank)
        finally:
            for node in nodes:
                stop_node(node)


def train_args(plan: Path, folder: Path, rank: int, addr: str, port: int, *, steps: int = STEPS,
               options: Sequence[str] = (), extra: Sequence[str] = (), script: Path = SCRIPTS / "train_zoo.py") -> list[str]:
    """`plait run` arguments for node ``rank`` of the 2x2 training job (``options`` for plait, ``extra`` for the script)."""
    return [str(script), "--nnodes", "2", "--node-rank", str(rank), "--master-addr", addr,
            "--master-port", str(port), "--plan", str(plan), "--out", str(folder / f"out{rank}"), "--timeout", "240",
            *options, "--", "--model", MODEL, "--steps", str(steps), "--lr", str(LR), "--pid-dir", str(folder / "pids"),
            *extra]


def check_matches_one_process(folder: Path, nodes: list[Node], addr: str, port: int, ifnames: Sequence[str]) -> None:
    """Both nodes finished, each ran its two ranks, and rank 0's losses and final state equal one process's."""
    wait_nodes(nodes)
    for node in nodes:
        assert node.proc.returncode == 0, node.stderr()[-3000:]
        k = node.rank
        assert (f"plait run: node {k} of 2 runs ranks {2 * k}-{2 * k + 1} of 4 (rendezvous {addr}:{port}, gloo on "
                f"{ifnames[k]}); mesh axes inside each node: dp_shard, across nodes: dp_replicate") in node.stderr()
        assert f"plait run: all 2 ranks of node {k} finished" in node.stderr()
        for r in (2 * k, 2 * k + 1):
            assert f"[rank {r}] rank {r}/4 on cpu (gloo)" in node.stdout()
    assert none_alive(read_pids(folder / "pids", 4))
    ref_losses, ref_state = reference()
    losses = [m.loss for m in read_metrics(folder / "out0" / "metrics.jsonl")]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=RTOL, atol=ATOL)
    state = torch.load(folder / "out0" / FINAL_FILE)
    assert state.keys() == ref_state.keys()
    for name, tensor in state.items():
        torch.testing.assert_close(tensor, ref_state[name], rtol=RTOL, atol=PARAM_ATOL,
                                   msg=lambda m, name=name: f"{name} after {STEPS} steps: {m}")


# ---- two nodes on loopback -----------------------------------------------------------------------------


def test_two_nodes_on_loopback_match_one_process(tmp_path: Path, plan_file: Path) -> None:
    port = free_port()
    args = [train_args(plan_file, tmp_path, k, "127.0.0.1", port) for k in (0, 1)]
    with two_nodes(tmp_path, args) as nodes:
        check_matches_one_process(tmp_path, nodes, "127.0.0.1", port, ("lo", "lo"))


def test_a_failing_rank_stops_both_nodes(tmp_path: Path, plan_file: Path) -> None:
    """Rank 3 (node 1) raises at step 1: node 1 stops its ranks and names it; node 0's ranks then fail at
    their next collective (the peer's connections close), long before the 300 s collective timeout."""
    port = free_port()
    args = [train_args(plan_file, tmp_path, k, "127.0.0.1", port, extra=["--fail-rank", "3", "--fail-step", "1"])
            for k in (0, 1)]
    with two_nodes(tmp_path, args) as (node0, node1):
        wait_nodes([node0, node1])
        pids = read_pids(tmp_path / "pids", 4)
        assert node1.proc.returncode == 1
        assert node1.errors() == [f"error: rank 3 (pid {pids[3]}) failed with exit code 1: ValueError: bad batch at step 1 "
                                  "on rank 3; stopped the other 1 ranks of node 1"]
        assert node0.proc.returncode == 1
        (error,) = node0.errors()
        assert error.startswith(("error: rank 0 ", "error: rank 1 ")) and error.endswith("stopped the other 1 ranks of node 0")
        assert node0.ended_at is not None and node1.ended_at is not None
        assert node0.ended_at - node1.ended_at < 120  # a closed peer, not the collective timeout, ended node 0
        assert none_alive(pids)


GATHERED_TRAIN_SCRIPT = """
import importlib.util, os, sys, time
from pathlib import Path

spec = importlib.util.spec_from_file_location("train_zoo", {script!r})
train_zoo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_zoo)  # its imports (torch, plait) before the gathering, not after
arrived = Path({arrived!r})
(arrived / os.environ["RANK"]).touch()
deadline = time.monotonic() + {wait_s!r}  # only a guard against waiting for ever on a rank that died
while len(list(arrived.iterdir())) < int(os.environ["WORLD_SIZE"]):
    if time.monotonic() > deadline:
        sys.exit(f"not every rank arrived in {wait_s} s")
    time.sleep(0.01)
train_zoo.main()
"""


def gathered_train_script(folder: Path) -> Path:
    """The launcher tests' training script, entered by every rank only once all ranks have started: the
    rendezvous then waits on no rank's interpreter start-up (seconds apart on a loaded machine), so a short
    collective timeout cannot fire before the ranks train."""
    arrived = folder / "arrived"
    arrived.mkdir()
    script = folder / "train_gathered.py"
    script.write_text(GATHERED_TRAIN_SCRIPT.format(script=str(SCRIPTS / "train_zoo.py"), arrived=str(arrived), wait_s=WAIT_S))
    return script


@pytest.mark.slow
def test_a_frozen_rank_times_out_on_both_nodes(tmp_path: Path, plan_file: Path) -> None:
    """SIGSTOP rank 3, as a node that hangs with its connections open: the other ranks raise at the collective
    timeout (--dist-timeout, which the mesh's sub-groups get too), and both launchers exit, well before --timeout.

    The timeout is short, yet only the frozen rank can make it fire: the ranks meet before the rendezvous
    (``gathered_train_script``), then train in lockstep, and rank 3 stops only once rank 0 has logged step 1,
    which needs every rank's loss, so every rank has passed that collective; what waits longer than the
    timeout after that waits on the frozen rank."""
    port, dist_timeout_s = free_port(), 10
    script = gathered_train_script(tmp_path)
    args = [train_args(plan_file, tmp_path, k, "127.0.0.1", port, steps=10_000, options=["--dist-timeout", str(dist_timeout_s)],
                       script=script) for k in (0, 1)]
    with two_nodes(tmp_path, args) as (node0, node1):
        wait_for(lambda: "[rank 0] step 1/" in node0.stdout() or node0.proc.poll() is not None or node1.proc.poll() is not None,
                 WAIT_S, "rank 0's first step")
        assert "[rank 0] step 1/" in node0.stdout(), node0.stderr()[-3000:] + node1.stderr()[-3000:]
        pids = read_pids(tmp_path / "pids", 4)
        os.kill(pids[3], signal.SIGSTOP)
        frozen_at = time.monotonic()
        wait_nodes([node0, node1])
        for node in (node0, node1):
            assert node.proc.returncode == 1, node.stderr()[-3000:]
            assert node.ended_at is not None and node.ended_at - frozen_at < dist_timeout_s + 90
            assert "ran past" not in node.stderr()
        (error,) = node1.errors()
        assert error.startswith(f"error: rank 2 (pid {pids[2]}) failed with exit code 1") and "of node 1" in error
        assert "timed out" in (node0.stderr() + node1.stderr()).lower()
        assert none_alive(pids)


def test_rank_environment_of_each_node(tmp_path: Path) -> None:
    script = tmp_path / "env.py"
    script.write_text(textwrap.dedent(ENV_SCRIPT))
    port = free_port()
    for k in (0, 1):
        out = io.StringIO()
        node = node_spec(nnodes=2, node_rank=k, master_addr="localhost", master_port=port)
        result = launch(script, nproc=2, node=node, dist_timeout_s=45, stdout=out, stderr=io.StringIO())
        assert result.ok and [ex.rank for ex in result.ranks] == [2 * k, 2 * k + 1]
        for local in (0, 1):
            r = 2 * k + local
            assert (f"[rank {r}] RANK={r} LOCAL_RANK={local} WORLD_SIZE=4 LOCAL_WORLD_SIZE=2 GROUP_RANK={k} "
                    f"GROUP_WORLD_SIZE=2 ROLE_RANK={r} MASTER_ADDR=127.0.0.1 MASTER_PORT={port} GLOO_SOCKET_IFNAME=lo "
                    "PLAIT_DIST_TIMEOUT_S=45") in out.getvalue().splitlines()


def test_torchrun_spellings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = tmp_path / "env.py"
    script.write_text(textwrap.dedent(ENV_SCRIPT))
    port = free_port()
    main(["run", str(script), "--nproc_per_node", "1", "--nnodes", "3", "--node_rank", "2", "--master_addr", "127.0.0.1",
          "--master_port", str(port), "--ifname", "lo"])
    captured = capsys.readouterr()
    assert "[rank 2] RANK=2 LOCAL_RANK=0 WORLD_SIZE=3 LOCAL_WORLD_SIZE=1 GROUP_RANK=2 GROUP_WORLD_SIZE=3" in captured.out
    assert "plait run: all 1 ranks of node 2 finished" in captured.err


def test_user_mistakes_fail_before_any_rank_starts(tmp_path: Path, plan_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = tmp_path / "env.py"
    script.write_text(textwrap.dedent(ENV_SCRIPT))
    two = ["--nnodes", "2", "--master-addr", "127.0.0.1"]
    cases = [
        (["--nproc", "2", "--nnodes", "2", "--node-rank", "2", "--master-addr", "127.0.0.1"],
         "--node-rank 2 is out of range for --nnodes 2: give 0 ... 1"),
        (["--nproc", "2", "--nnodes", "2"], "--nnodes 2 needs --master-addr"),
        (["--nproc", "2", "--nnodes", "0"], "--nnodes must be at least 1"),
        (["--nproc", "2", *two, "--master-port", "0"], "--master-port must be a TCP port"),
        (["--nproc", "2", *two, "--ifname", "no-such-if0"], "--ifname no-such-if0: this machine has no network interface"),
        (["--nproc", "2", *two, "--dist-timeout", "0"], "--dist-timeout must be a positive number"),
        (["--plan", str(plan_file), "--nproc", "1", *two], "is for 4 ranks (mesh (2, 2)), which does not match "
                                                             "--nnodes 2 x --nproc 1 = 2; use --nproc 2"),
        (["--plan", str(plan_file), "--nnodes", "3", "--master-addr", "127.0.0.1"], "use a number of nodes that divides 4"),
    ]
    for options, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["run", str(script), *options])
        assert exit_info.value.code == 2
        captured = capsys.readouterr()
        assert captured.err.startswith("error: ") and message in captured.err, (options, captured.err)
        assert "Traceback" not in captured.err and "RANK=" not in captured.out


def test_mesh_axes_on_nodes() -> None:
    assert mesh_on_nodes((2, 2), ("dp_replicate", "dp_shard"), 2) == (("dp_shard",), ("dp_replicate",))
    assert mesh_on_nodes((2, 2, 4), ("pp", "dp", "tp"), 8) == (("dp", "tp"), ("pp",))
    assert mesh_on_nodes((4, 2), ("dp", "tp"), 4) == (("tp",), ("dp",))
    assert mesh_on_nodes((8,), ("dp",), 4) == ((), ("dp",))  # a group of 8 spans two nodes of 4
    assert mesh_on_nodes((2, 3), ("dp", "tp"), 2) == ((), ("dp", "tp"))  # rows of 3 straddle nodes of 2
    assert mesh_on_nodes((1, 4), ("pp", "dp"), 4) == (("pp", "dp"), ())
    assert interface_to("127.0.0.1") == "lo"


# ---- two nodes in network namespaces -------------------------------------------------------------------


@dataclass(frozen=True)
class NetNodes:
    """Two network namespaces joined by a veth pair: namespace, veth end and address of each node."""

    names: tuple[str, str]
    links: tuple[str, str]
    addrs: tuple[str, str]

    def prefix(self, rank: int) -> list[str]:
        """The command prefix that runs a program in node ``rank``'s namespace."""
        return ["ip", "netns", "exec", self.names[rank]]


def ip(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `ip ARGS`; its result (never raises on failure)."""
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=60, check=False)


def ip_ok(*args: str) -> None:
    """Run `ip ARGS` and fail the test if it fails."""
    done = ip(*args)
    assert done.returncode == 0, f"ip {' '.join(args)}: {done.stderr.strip()}"


@pytest.fixture
def namespaces() -> Iterator[NetNodes]:
    """Two namespaces 10.77.0.1/24 and 10.77.0.2/24 on a veth pair; deleted on the way out, also on failure."""
    if shutil.which("ip") is None:
        pytest.skip("the `ip` command (iproute2) is not installed")
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    tag = os.getpid()
    net = NetNodes(names=(f"plaitmn{tag}a", f"plaitmn{tag}b"), links=(f"pmn{tag}a", f"pmn{tag}b"), addrs=NS_ADDRS)
    made: list[str] = []
    try:
        for name in net.names:
            done = ip("netns", "add", name)
            if done.returncode != 0:
                pytest.skip(f"cannot create network namespaces here (`ip netns add`: {done.stderr.strip()})")
            made.append(name)
        ip_ok("link", "add", net.links[0], "type", "veth", "peer", "name", net.links[1])
        for name, link, addr in zip(net.names, net.links, net.addrs, strict=True):
            ip_ok("link", "set", link, "netns", name)
            ip_ok("-n", name, "addr", "add", f"{addr}/24", "dev", link)
            ip_ok("-n", name, "link", "set", link, "up")
            ip_ok("-n", name, "link", "set", "lo", "up")
        yield net
    finally:
        if ip("link", "show", net.links[0]).returncode == 0:  # never moved into its namespace
            ip("link", "del", net.links[0])
        for name in made:
            ip("netns", "del", name)
        left = ip("netns", "list").stdout
        assert not any(name in left for name in made), f"network namespaces left behind: {left}"


def test_two_nodes_in_namespaces_match_one_process(tmp_path: Path, plan_file: Path, namespaces: NetNodes) -> None:
    addr, port = namespaces.addrs[0], 29500
    args = [train_args(plan_file, tmp_path, k, addr, port) for k in (0, 1)]
    prefixes = [namespaces.prefix(k) for k in (0, 1)]
    with two_nodes(tmp_path, args, prefixes) as nodes:
        check_matches_one_process(tmp_path, nodes, addr, port, namespaces.links)
