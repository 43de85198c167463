"""The ``arbs`` command group: global options, logging, and the registry of commands.

To add a command: write ``cli/<name>.py`` defining a ``@click.command`` function, import that module
below, and append the command object to ``COMMANDS``.
"""

from __future__ import annotations

import click

import arbs

from . import compare, convert, evaluate, fuse, inspect, train
from .common import setup_logging

# One click command per module (click examples/complex). Registered in this order.
COMMANDS: list[click.Command] = [
    train.train_cmd,
    evaluate.eval_cmd,
    evaluate.generate_cmd,
    compare.compare_cmd,
    convert.convert_cmd,
    fuse.fuse_cmd,
    inspect.inspect_cmd,
]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(arbs.__version__, "--version", prog_name="arbs", message="%(prog)s %(version)s")
@click.option("-v", "--verbose", count=True, help="Log progress to stderr: -v for INFO, -vv for DEBUG.")
def main(verbose: int) -> None:
    """arbs: train ternary (1.58-bit) networks whose persistent state is integer only.

    Checkpoints live in run directories: CKPT arguments accept a run directory (its LATEST
    checkpoint) or a step_<N> directory inside it.
    """
    setup_logging(verbose)


for _cmd in COMMANDS:
    main.add_command(_cmd)


if __name__ == "__main__":  # pragma: no cover
    main()
