"""``plait run``: launch a training script on N ranks per node, on one node or several (torchrun's options)."""

from __future__ import annotations

import os

import click

from plait.errors import PlaitError
from plait.runtime.envvars import ADAPTIVE_ENV, INIT_BATCH_ENV, LR_SCALING_ENV

# plait.adaptive.LR_SCALING_RULES, spelled out so that `plait run --help` does not import torch (a test compares)
LR_SCALING_CHOICES = ("none", "linear", "sqrt", "adascale", "adamscale", "auto")


def adaptive_env(adaptive: bool, lr_scaling: str | None, init_batch_size: int | None) -> dict[str, str]:
    """The ranks' adaptive-training variables (PLAIT_ADAPTIVE=0 when off, so an inherited 1 does not leak in)."""
    if not adaptive and (lr_scaling is not None or init_batch_size is not None):
        raise PlaitError("--lr-scaling and --init-batch-size only apply with --adaptive; add --adaptive")
    if init_batch_size is not None and init_batch_size < 1:
        raise PlaitError(f"--init-batch-size must be a positive number of samples, got {init_batch_size}")
    # every variable set (empty: not given), so none exported in the shell leaks into the ranks
    return {ADAPTIVE_ENV: "1" if adaptive else "0", LR_SCALING_ENV: lr_scaling or "",
            INIT_BATCH_ENV: str(init_batch_size) if init_batch_size is not None else ""}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("script")
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED)
@click.option("-m", "--module", is_flag=True, help="SCRIPT is a module, run as `python -m SCRIPT` (like torchrun -m).")
@click.option("--nproc", "--nproc-per-node", "--nproc_per_node", "-n", "nproc", type=int, default=None,
              help="Ranks on this node (default: the plan's world size over --nnodes).")
@click.option("--nnodes", type=int, default=1, show_default=True, help="Number of nodes; run `plait run` on each.")
@click.option("--node-rank", "--node_rank", "node_rank", type=int, default=0, show_default=True,
              help="This node's index, 0 ... nnodes-1; node k runs ranks k*nproc ... k*nproc+nproc-1.")
@click.option("--master-addr", "--master_addr", "master_addr", default=None,
              help="Address of node 0, reachable from every node (needed with --nnodes > 1).")
@click.option("--master-port", "--master_port", "master_port", type=int, default=None,
              help="Rendezvous port on node 0 (default: 29500 across nodes, a free port on one node).")
@click.option("--ifname", default=None, help="Network interface for gloo (default: the one that carries --master-addr; lo on one node).")
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False), default=None, help="Plan JSON for the script (PLAIT_PLAN).")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in --out (PLAIT_RESUME=1).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, help="Output folder: metrics, checkpoints (PLAIT_OUT).")
@click.option("--timeout", "timeout_s", type=float, default=None, help="Stop this node's ranks after this many seconds.")
@click.option("--dist-timeout", "dist_timeout_s", type=float, default=None,
              help="Seconds a rendezvous or collective may wait before it raises (PLAIT_DIST_TIMEOUT_S; ranks default to 300).")
@click.option("--adaptive", is_flag=True,
              help="Adaptive training: noise scale, learning-rate scaling, progress (PLAIT_ADAPTIVE=1; docs/adaptive.md).")
@click.option("--lr-scaling", "lr_scaling", type=click.Choice(LR_SCALING_CHOICES), default=None,
              help="With --adaptive: the learning-rate rule (PLAIT_LR_SCALING; default auto).")
@click.option("--init-batch-size", "init_batch_size", type=int, default=None,
              help="With --adaptive: the batch M0 the learning rate is tuned for (PLAIT_INIT_BATCH_SIZE; default: the plan's).")
def run(
    script: str,
    script_args: tuple[str, ...],
    module: bool,
    nproc: int | None,
    nnodes: int,
    node_rank: int,
    master_addr: str | None,
    master_port: int | None,
    ifname: str | None,
    plan_path: str | None,
    resume: bool,
    out_dir: str | None,
    timeout_s: float | None,
    dist_timeout_s: float | None,
    adaptive: bool,
    lr_scaling: str | None,
    init_batch_size: int | None,
) -> None:
    """Run SCRIPT (a Python file, or a module with -m) on N ranks of this node (gloo on the CPU, or NCCL on
    local GPUs); arguments after -- go to SCRIPT.

    Each rank gets torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK,
    MASTER_ADDR, MASTER_PORT, ...) with OMP_NUM_THREADS=1, and its output lines are prefixed with "[rank R]".
    If one rank fails or dies, every rank of this node is stopped and the command exits non-zero naming it.

    Across nodes, run the same command on every node with --nnodes, its own --node-rank and node 0's
    --master-addr (static rendezvous, as torchrun's); a plan's mesh fills the ranks row-major, node by node.

    --adaptive (with --lr-scaling, --init-batch-size) sets PLAIT_ADAPTIVE=1 (PLAIT_LR_SCALING,
    PLAIT_INIT_BATCH_SIZE) for the ranks; a script's TrainConfig.from_env(...) picks them up.
    """
    from plait.runtime.launch import launch, raise_on_failure
    from plait.runtime.nodes import node_spec

    if nproc is None and plan_path is None:
        raise PlaitError("give --nproc N (or --plan PLAN.json, whose mesh fixes the number of ranks)")
    if resume and out_dir is None:
        raise PlaitError("--resume needs --out DIR: the folder whose checkpoints/ the run continues from")
    env = {k: v for k, v in os.environ.items() if k not in (LR_SCALING_ENV, INIT_BATCH_ENV)}
    env.update(adaptive_env(adaptive, lr_scaling, init_batch_size))
    node = node_spec(nnodes=nnodes, node_rank=node_rank, master_addr=master_addr, master_port=master_port, ifname=ifname)
    result = launch(script, nproc=nproc, module=module, script_args=script_args, plan=plan_path, resume=resume,
                    out_dir=out_dir, node=node, dist_timeout_s=dist_timeout_s, timeout_s=timeout_s, env=env)
    raise_on_failure(result)
    click.echo(f"plait run: all {len(result.ranks)} ranks{node.where()} finished in {result.elapsed_s:.1f} s", err=True)
