"""``plait run``: launch a training script on N local ranks."""

from __future__ import annotations

import click

from plait.errors import PlaitError


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("script")
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED)
@click.option("-m", "--module", is_flag=True, help="SCRIPT is a module, run as `python -m SCRIPT` (like torchrun -m).")
@click.option("--nproc", "-n", type=int, default=None, help="Number of local ranks (default: the plan's world size).")
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False), default=None, help="Plan JSON for the script (PLAIT_PLAN).")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in --out (PLAIT_RESUME=1).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, help="Output folder: metrics, checkpoints (PLAIT_OUT).")
@click.option("--timeout", "timeout_s", type=float, default=None, help="Stop every rank after this many seconds.")
def run(
    script: str,
    script_args: tuple[str, ...],
    module: bool,
    nproc: int | None,
    plan_path: str | None,
    resume: bool,
    out_dir: str | None,
    timeout_s: float | None,
) -> None:
    """Run SCRIPT (a Python file, or a module with -m) on N local ranks (gloo on 127.0.0.1, or NCCL on local
    GPUs); arguments after -- go to SCRIPT.

    Each rank gets torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT) with OMP_NUM_THREADS=1, and its output lines are prefixed with "[rank R]". If one rank
    fails or dies, every rank is stopped and the command exits non-zero naming that rank.
    """
    from plait.runtime.launch import launch, raise_on_failure

    if nproc is None and plan_path is None:
        raise PlaitError("give --nproc N (or --plan PLAN.json, whose mesh fixes the number of ranks)")
    if resume and out_dir is None:
        raise PlaitError("--resume needs --out DIR: the folder whose checkpoints/ the run continues from")
    result = launch(script, nproc=nproc, module=module, script_args=script_args, plan=plan_path, resume=resume,
                    out_dir=out_dir, timeout_s=timeout_s)
    raise_on_failure(result)
    click.echo(f"plait run: all {len(result.ranks)} ranks finished in {result.elapsed_s:.1f} s", err=True)
