"""The ``plait`` command: one subcommand per module in ``plait.cli``, imported only when used."""

from __future__ import annotations

import importlib
import sys

import click

from plait.errors import PlaitError

# subcommand name -> (module, attribute, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("plait.cli.demo_cmd", "demo", "Plan, train and check a small GPT on this machine (the main job)."),
    "plan": ("plait.cli.plan_cmd", "plan", "Choose a parallel plan for a model on a cluster and explain it."),
    "sim": ("plait.cli.sim_cmd", "sim", "Simulate a plan: step time, overlap, memory, timeline image."),
    "run": ("plait.cli.run_cmd", "run", "Launch a training script on N ranks per node (one or several nodes)."),
    "profile": ("plait.cli.profile_cmd", "profile", "Measure this machine and write a profile for the cost model."),
    "cluster": ("plait.cli.cluster_cmd", "cluster", "Show a cluster preset or file."),
    "sched": ("plait.cli.sched_cmd", "sched", "Cluster scheduling: trace-driven simulation of policies."),
    "report": ("plait.cli.report_cmd", "report", "Draw a run's metrics (loss, step time, adaptive batch) as PNGs."),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use, so ``plait --help`` stays fast."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[cmd_name]
        command = getattr(importlib.import_module(module), attr)
        assert isinstance(command, click.Command)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_text) for name, (_, _, help_text) in COMMANDS.items()])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="plait")
def cli() -> None:
    """plait: automated, composable and adaptive distributed training for PyTorch."""


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the CLI and turns user errors into one message and a non-zero exit code."""
    try:
        cli.main(args=argv, prog_name="plait", standalone_mode=False)
    except PlaitError as exc:
        click.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(exc.exit_code)
    except OSError as exc:  # a path that cannot be read or written, a full disk: the user's environment
        where = f" {exc.filename}" if exc.filename else ""
        click.secho(f"error: cannot access{where}: {exc.strerror or exc} (check the path and its permissions)", fg="red", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
