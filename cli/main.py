"""The ``arbs`` command group: global options, logging, and the registry of commands.

Commands are imported when used, so ``arbs --help`` and ``arbs --version`` import no torch. To add a
command: write ``cli/<name>.py`` defining a ``@click.command`` function whose module imports only
at the top only modules that need no torch, zarr or numba (click, arbs.formats, arbs.training.config),
and add it to ``COMMANDS``.
"""

from __future__ import annotations

import importlib

import click

import arbs

from .common import setup_logging

# name -> "module:attribute", one click command per module (click examples/complex); listed in this order.
COMMANDS: dict[str, str] = {
    "train": "train:train_cmd",
    "eval": "evaluate:eval_cmd",
    "generate": "evaluate:generate_cmd",
    "compare": "compare:compare_cmd",
    "convert": "convert:convert_cmd",
    "fuse": "fuse:fuse_cmd",
    "export": "export:export_cmd",
    "inspect": "inspect:inspect_cmd",
}


class LazyGroup(click.Group):
    """A click group that imports a command's module only when the command is looked up."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(f"{__package__}.{module}"), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(arbs.__version__, "--version", prog_name="arbs", message="%(prog)s %(version)s")
@click.option("-v", "--verbose", count=True, help="Log progress to stderr: -v for INFO, -vv for DEBUG.")
def main(verbose: int) -> None:
    """arbs: train ternary (1.58-bit) networks whose persistent state is integer only.

    Checkpoints live in run directories: CKPT arguments accept a run directory (its newest
    committed checkpoint) or a step_<N> directory inside it.
    """
    setup_logging(verbose)


if __name__ == "__main__":  # pragma: no cover
    main()
