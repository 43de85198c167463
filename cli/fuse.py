"""arbs fuse."""

from __future__ import annotations

import click

from .common import arbs_errors, echo_json


@click.command("fuse")
@click.argument("ckpt")
@click.option("--out", default=None, metavar="PATH",
              help="Run directory to write (new, empty, or an existing run dir). "
                   "Default: '<source run dir>-fused' ('-keep-accum' with --keep-accum) next to the source.")
@click.option("--keep-accum", is_flag=True,
              help="Export the training state unchanged (continuous S = 2**(E+Xi) at inference) "
                   "instead of fusing Xi into E.")
@click.option("--grid", type=int, default=None, metavar="N",
              help="Fuse onto a coarser scale grid: every N consecutive weights of a row share one E "
                   "(256: llama.cpp's TQ1_0/TQ2_0 then hold the model exactly; see docs/deploy.md). "
                   "Also re-grids an already fused checkpoint.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document with the report on stdout.")
@arbs_errors
def fuse_cmd(ckpt, out, keep_accum, grid, as_json):
    """Fuse a training checkpoint into an inference checkpoint.

    The result holds T_packed and E_fused = clip(rint(E + Xi), -128, 127) per tensor, so
    S = 2**E exactly; corr_accum, flip_accum and the step counter are dropped. --keep-accum copies
    the training state unchanged instead. The input is never modified.

    CKPT is a run directory (its newest committed checkpoint) or a step_<N> directory.
    """
    from arbs.fuse import fuse_path

    report = fuse_path(ckpt, out, keep_accum=keep_accum, grid=grid)
    if as_json:
        echo_json(report.to_dict())
        return
    if report.mode == "fused":
        rows = [(t.name, "x".join(map(str, t.shape)), str(t.groups), str(t.changed), str(t.clipped))
                + ((f"{t.grid_rel_l2:.4f}",) if report.grid else ()) for t in report.tensors]
        header = ("tensor", "shape", "groups", "E_changed", "clipped") + (("grid_rel_l2",) if report.grid else ())
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        for r in [header, tuple("-" * w for w in widths), *rows]:
            click.echo("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        click.echo(f"fused {len(report.tensors)} tensors ({report.format}, rule {report.rule}, step {report.step_counter}): "
                   f"{report.changed} of {report.groups} groups changed E, {report.clipped} clipped"
                   + (f"; one E per {report.grid} weights of a row" if report.grid else ""))
    else:
        click.echo(f"exported the training state unchanged ({report.format}, rule {report.rule}, "
                   f"step {report.step_counter}, {len(report.tensors)} tensors)")
    click.echo(f"saved {report.path}")

