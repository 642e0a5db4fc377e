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
@click.option("--elastic", is_flag=True,
              help="Elastic run: the number of ranks may change while it runs, as the control file asks; needs --plan "
                   "(written by `plait plan --out`) and --out (docs/elastic.md).")
@click.option("--control", "control", type=click.Path(dir_okay=False), default=None,
              help="With --elastic: the control file holding {\"nproc\": N} (default OUT/elastic.json); re-read every "
                   "0.5 s and at once on SIGHUP to this process.")
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
    elastic: bool,
    control: str | None,
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

    --elastic: when the control file asks for another number of ranks, the job re-plans the plan's recorded request
    for that many, the ranks checkpoint at a step boundary and restart there, resuming (docs/elastic.md).
    """
    from plait.runtime.launch import launch, raise_on_failure
    from plait.runtime.nodes import node_spec

    if nproc is None and plan_path is None:
        raise PlaitError("give --nproc N (or --plan PLAN.json, whose mesh fixes the number of ranks)")
    if resume and out_dir is None:
        raise PlaitError("--resume needs --out DIR: the folder whose checkpoints/ the run continues from")
    env = {k: v for k, v in os.environ.items() if k not in (LR_SCALING_ENV, INIT_BATCH_ENV)}
    env.update(adaptive_env(adaptive, lr_scaling, init_batch_size))
    if control is not None and not elastic:
        raise PlaitError("--control only applies with --elastic; add --elastic")
    if elastic:
        _run_elastic(script, script_args, module, plan_path, out_dir, control, resume, nnodes, nproc, env,
                     dist_timeout_s, timeout_s)
        return
    node = node_spec(nnodes=nnodes, node_rank=node_rank, master_addr=master_addr, master_port=master_port, ifname=ifname)
    result = launch(script, nproc=nproc, module=module, script_args=script_args, plan=plan_path, resume=resume,
                    out_dir=out_dir, node=node, dist_timeout_s=dist_timeout_s, timeout_s=timeout_s, env=env)
    raise_on_failure(result)
    click.echo(f"plait run: all {len(result.ranks)} ranks{node.where()} finished in {result.elapsed_s:.1f} s", err=True)


def _run_elastic(script: str, script_args: tuple[str, ...], module: bool, plan_path: str | None, out_dir: str | None,
                 control: str | None, resume: bool, nnodes: int, nproc: int | None, env: dict[str, str],
                 dist_timeout_s: float | None, timeout_s: float | None) -> None:
    """``plait run --elastic``: run, and re-plan and restart at each new size the control file asks for."""
    from plait.elastic import elastic_run
    from plait.runtime.launch import raise_on_failure

    if plan_path is None or out_dir is None:
        raise PlaitError("--elastic needs --plan PLAN.json (re-planned at each resize) and --out DIR (its checkpoints "
                         "carry the job across a resize)")
    if nnodes != 1:
        raise PlaitError("--elastic runs on one node for now; drop --nnodes (or run without --elastic)")
    job = elastic_run(script, plan=plan_path, out_dir=out_dir, control=control, script_args=script_args, module=module,
                      resume=resume, env=env, dist_timeout_s=dist_timeout_s, timeout_s=timeout_s)
    if nproc is not None and nproc != job.nproc:
        raise PlaitError(f"plan {plan_path} is for {job.nproc} ranks but --nproc is {nproc}; drop --nproc (the plan "
                         "fixes the start size) or re-plan")
    click.echo(f"plait run: elastic job on {job.nproc} ranks; write {{\"nproc\": N}} to {job.control} (then SIGHUP "
               f"pid {os.getpid()}, or wait 0.5 s) to resize it", err=True)
    ended = job.run()
    raise_on_failure(ended.result)
    resized = f" after {len(ended.resizes)} resize(s)" if ended.resizes else ""
    click.echo(f"plait run: all {ended.nproc} ranks finished in {ended.result.elapsed_s:.1f} s{resized}", err=True)
