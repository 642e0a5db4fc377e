"""Join the job's process group from a torchrun-compatible environment and describe this rank."""

from __future__ import annotations

import datetime
import gc
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from plait.errors import PlaitError
from plait.runtime.envvars import DIST_TIMEOUT_ENV

DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True, kw_only=True)
class DistContext:
    """Where this process stands in the job: its rank, the world, its device and the backend."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        """True on rank 0, which writes checkpoints, metrics files and the progress bar."""
        return self.rank == 0


@dataclass(frozen=True, kw_only=True)
class RankEnv:
    """The rank's placement as the launcher's environment variables give it."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str | None
    master_port: int | None


def _int_env(env: Mapping[str, str], key: str, default: int) -> int:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise PlaitError(f"environment variable {key}={raw!r} is not an integer; launch with `plait run` or torchrun") from None


def read_rank_env(env: Mapping[str, str] | None = None) -> RankEnv:
    """Parse RANK, WORLD_SIZE, LOCAL_RANK, ... (absent: a single process of rank 0)."""
    env = os.environ if env is None else env
    world_size = _int_env(env, "WORLD_SIZE", 1)
    rank = _int_env(env, "RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise PlaitError(f"RANK={rank} does not fit WORLD_SIZE={world_size}; launch with `plait run` or torchrun")
    local_world_size = _int_env(env, "LOCAL_WORLD_SIZE", world_size)
    local_rank = _int_env(env, "LOCAL_RANK", rank % local_world_size)
    port = env.get("MASTER_PORT")
    return RankEnv(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        master_addr=env.get("MASTER_ADDR"),
        master_port=int(port) if port else None,
    )


def pick_device(local_rank: int, device: str | None = None) -> tuple[torch.device, str]:
    """The rank's device and backend: ``cuda:LOCAL_RANK`` with NCCL when CUDA is present, else CPU with gloo."""
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise PlaitError("device 'cuda' was asked for but CUDA is not available; use device='cpu'")
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise PlaitError(f"local rank {local_rank} has no GPU (this node has {count}); launch at most {count} ranks per node")
        return torch.device("cuda", local_rank), "nccl"
    if kind != "cpu":
        raise PlaitError(f"unknown device {kind!r}; use 'cpu' or 'cuda'")
    return torch.device("cpu"), "gloo"


def dist_timeout_s(timeout_s: float | None = None, env: Mapping[str, str] | None = None) -> float:
    """The process group's timeout: ``timeout_s`` if given, else PLAIT_DIST_TIMEOUT_S, else 300 s."""
    if timeout_s is not None:
        return timeout_s
    raw = (os.environ if env is None else env).get(DIST_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise PlaitError(f"{DIST_TIMEOUT_ENV}={raw!r} is not a positive number of seconds; fix or unset it")
    return value


def _default_group_timeout(timeout: datetime.timedelta) -> None:
    """Give groups made later without a timeout (a DeviceMesh's sub-groups) the job's timeout, not torch's 30 min."""
    c10d.default_pg_timeout = timeout
    c10d.default_pg_nccl_timeout = timeout


def init_distributed(*, device: str | None = None, timeout_s: float | None = None) -> DistContext:
    """Join the process group described by the environment (or make a one-rank group) and return the context.

    ``timeout_s`` bounds the rendezvous and every collective (default: PLAIT_DIST_TIMEOUT_S, else 300 s), so a
    rank whose peer on another node is gone without closing its connections raises instead of waiting for ever.
    """
    renv = read_rank_env()
    dev, backend = pick_device(renv.local_rank, device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    timeout = datetime.timedelta(seconds=dist_timeout_s(timeout_s))
    if dist.is_initialized():
        raise PlaitError("torch.distributed is already initialised in this process; call init_distributed() once")
    _default_group_timeout(timeout)
    if renv.world_size == 1 and renv.master_port is None:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        if renv.master_addr is None or renv.master_port is None:
            raise PlaitError(f"WORLD_SIZE={renv.world_size} but MASTER_ADDR/MASTER_PORT are not set; launch with `plait run`")
        dist.init_process_group(
            backend,
            init_method=f"tcp://{renv.master_addr}:{renv.master_port}",
            rank=renv.rank,
            world_size=renv.world_size,
            timeout=timeout,
            device_id=dev if dev.type == "cuda" else None,
        )
    return DistContext(
        rank=renv.rank,
        world_size=renv.world_size,
        local_rank=renv.local_rank,
        local_world_size=renv.local_world_size,
        device=dev,
        backend=backend,
    )


def teardown() -> None:
    """Leave the process group (no-op when none is initialised).

    After a successful run call ``dist.barrier()`` first (``distributed()`` and ``Trainer.fit`` do), so
    no rank tears gloo down while another still talks to it; never on an error path, where a peer may be gone.
    """
    if dist.is_initialized():
        dist.destroy_process_group()
        # Free the group's objects (rank 0's rendezvous store and its server thread) now, while the interpreter is
        # whole: CI saw rank 0 abort at exit after a finished run ("terminate called without an active exception").
        gc.collect()


@contextmanager
def distributed(*, device: str | None = None, timeout_s: float | None = None) -> Iterator[DistContext]:
    """``init_distributed`` for the duration of a ``with`` block, with teardown on the way out."""
    ctx = init_distributed(device=device, timeout_s=timeout_s)
    try:
        yield ctx
        dist.barrier()  # leave together: a rank tearing gloo down early can abort a slower rank's threads
    finally:
        teardown()
