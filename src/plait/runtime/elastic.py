"""Elastic resize, the ranks' side: notice a resize request, agree on it at a step boundary, checkpoint and leave.

``plait run --elastic`` (``plait.runtime.elastic_launch``) starts every rank with ``PLAIT_ELASTIC_DIR`` set. A
Trainer on such a rank (``ElasticFlag.for_run``) installs a handler for ``SIGUSR1`` that only sets a rank-local
flag, then writes ``<dir>/<rank>.ready`` (its pid) so the launcher knows it may signal it. After every optimizer
step the ranks combine their flags in one all-reduce of a single integer (MAX), so they all see a request at the
same step boundary even if the signal reached them at different times; the Trainer then writes its checkpoint
(model, optimizer, RNG and sample-stream position) and every rank exits with ``RESIZE_EXIT``. The launcher
re-plans for the new number of ranks and starts them again with ``--resume``. See docs/elastic.md.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, NoReturn

import torch
import torch.distributed as dist

from plait.errors import PlaitError
from plait.runtime.context import DistContext, teardown
from plait.runtime.envvars import ELASTIC_ENV, RESUME_ENV, env_flag

if TYPE_CHECKING:
    from plait.runtime.metrics import MetricsLog

RESIZE_EXIT = 75  # every rank's exit status when it leaves for a resize (EX_TEMPFAIL: "try again")
RESIZE_SIGNAL = signal.SIGUSR1  # what the launcher sends a rank to ask for a resize


def ready_file(folder: str | os.PathLike[str], rank: int) -> Path:
    """Where rank ``rank`` says (with its pid) that it listens for ``RESIZE_SIGNAL``."""
    return Path(folder) / f"{rank}.ready"


def asked_file(folder: str | os.PathLike[str], rank: int) -> Path:
    """Where rank ``rank`` notes that it has received ``RESIZE_SIGNAL`` (for launchers and tests to see)."""
    return Path(folder) / f"{rank}.asked"


class ElasticFlag:
    """A rank's view of resize requests: a flag set by ``RESIZE_SIGNAL``, agreed on by all ranks once per step."""

    def __init__(self, ctx: DistContext, folder: str | os.PathLike[str]) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise PlaitError("an elastic run's Trainer.fit must run on the rank's main thread (it takes the launcher's "
                             f"{RESIZE_SIGNAL.name} there); call fit() from the main thread or run without --elastic")
        self.ctx = ctx
        self.asked = False  # set by the signal handler
        self.check_s = 0.0  # time spent agreeing, over all steps (the elastic overhead)
        self.checks = 0
        # a CPU group for the flag, so a GPU job does not sync its stream for it
        self.group = dist.new_group(backend="gloo") if ctx.backend != "gloo" else None
        self.buf = torch.zeros(1, dtype=torch.int32)
        self.previous = signal.signal(RESIZE_SIGNAL, self._on_signal)
        self.asked_path = asked_file(folder, ctx.rank)
        ready = ready_file(folder, ctx.rank)
        ready.parent.mkdir(parents=True, exist_ok=True)
        ready.write_text(str(os.getpid()))

    @classmethod
    def for_run(cls, ctx: DistContext, *, out_dir: str | None, resume: bool) -> ElasticFlag | None:
        """The flag when ``plait run --elastic`` started this rank (None otherwise); refuses a config that could not
        continue after a resize."""
        folder = os.environ.get(ELASTIC_ENV)
        if not folder:
            return None
        if out_dir is None:
            raise PlaitError("an elastic run checkpoints before each resize but this Trainer has no out_dir; build its "
                             "config with TrainConfig.from_env(...) (it reads `plait run --out`)")
        if env_flag(RESUME_ENV) and not resume:
            raise PlaitError("this rank was restarted after a resize (PLAIT_RESUME=1) but its TrainConfig has resume=False, "
                             "so it would start again from step 0; build the config with TrainConfig.from_env(...)")
        return cls(ctx, folder)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self.asked:
            self.asked = True
            with contextlib.suppress(OSError):
                self.asked_path.write_text(str(os.getpid()))

    def requested(self) -> bool:
        """True on every rank when any rank has been asked to resize (collective: every rank calls it each step)."""
        t0 = time.perf_counter()
        self.buf.fill_(1 if self.asked else 0)
        dist.all_reduce(self.buf, op=dist.ReduceOp.MAX, group=self.group)
        agreed = bool(self.buf.item())
        self.check_s += time.perf_counter() - t0
        self.checks += 1
        return agreed

    def leave(self, step: int, log: MetricsLog) -> NoReturn:
        """After the checkpoint of ``step``: leave the job together and exit with ``RESIZE_EXIT``."""
        per_step = self.check_s / max(1, self.checks) * 1e3
        log.print(f"elastic: leaving after step {step} for a resize (checkpoint written; "
                  f"resize checks took {per_step:.3f} ms per step)")
        signal.signal(RESIZE_SIGNAL, self.previous)
        dist.barrier()
        teardown()
        raise SystemExit(RESIZE_EXIT)
