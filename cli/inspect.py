"""arbs inspect."""

from __future__ import annotations

import click

from .common import arbs_errors, echo_json


@click.command("inspect")
@click.argument("ckpt")
@click.option("--bpw", is_flag=True,
              help="Add theoretical bits/weight and per-array byte counts next to the measured figures "
                   "(and list a user model's float parameters, counted apart).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document with the summary on stdout.")
@arbs_errors
def inspect_cmd(ckpt, bpw, as_json):
    """Show bits/weight, sparsity, E and Xi statistics of a checkpoint.

    CKPT is a run directory (its newest committed checkpoint) or a step_<N> directory. A checkpoint of a
    user's model that keeps float parameters (arbs.nn.save) counts their bytes apart and says it is not
    integer-only.
    """
    from arbs.inspect import render_text, summarize_path

    summary = summarize_path(ckpt, bpw=bpw)
    if as_json:
        echo_json(summary)
    else:
        click.echo(render_text(summary))
