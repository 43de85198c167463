"""arbs export."""

from __future__ import annotations

import click

from .common import arbs_errors, echo_json

_TYPES = ("tq1_0", "tq2_0", "q4_0", "q8_0", "bf16", "f16", "f32")  # arbs.export.GGUF_TYPES (no torch import here)
PARAMETER_GOLF = (68_000_000, 15_880_000)  # arbs.export.PARAMETER_GOLF: ternary params, lzma'd bytes


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f} MB"


@click.command("export")
@click.argument("ckpt")
@click.option("--to", "to", type=click.Choice(["hf", "gguf", "e1tm"]), required=True,
              help="hf: a transformers directory; gguf: one llama.cpp file; e1tm: one portable integer file.")
@click.argument("out", metavar="OUT")
@click.option("--type", "qtype", default=None, metavar="TYPE[,TYPE...]",
              help=f"--to gguf: the type of every weight tensor, one of {', '.join(_TYPES)}; a list gives each "
                   "tensor the first type that holds it exactly (e.g. tq2_0,q4_0) [default: per tensor the smallest "
                   "exact type].")
@click.option("--fuse", is_flag=True,
              help="Fuse a training checkpoint in memory (as 'arbs fuse' would; the checkpoint is not changed). "
                   "Without it a training checkpoint is refused.")
@click.option("--grid", type=int, default=None, metavar="N",
              help="Fuse onto a coarser scale grid first (one E per N weights of a row; 256 for TQ1_0/TQ2_0), "
                   "as 'arbs fuse --grid N'.")
@click.option("--allow-lossy", is_flag=True,
              help="--to gguf: quantize tensors the --type cannot hold exactly (llama.cpp's quantizer) and report "
                   "each tensor's error, instead of refusing.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (atomically, once the export is complete).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document with the report on stdout.")
@arbs_errors
def export_cmd(ckpt, to, out, qtype, fuse, grid, allow_lossy, force, as_json):
    """Export a checkpoint to Hugging Face, GGUF (llama.cpp) or a portable E1TM file, exactly.

    CKPT is a run directory (its newest committed checkpoint), a step_<N> directory or an e1tm file;
    OUT the directory (hf) or file (gguf, e1tm) to write. Every tensor written is read back and compared
    with the fused weights bit for bit before OUT appears. See docs/deploy.md.
    """
    from arbs.export import export

    for t in (qtype.split(",") if qtype else []):
        if t not in _TYPES:
            raise click.BadParameter(f"{t!r} is not one of {', '.join(_TYPES)}", param_hint="'--type'")

    r = export(ckpt, out, to=to, type=qtype, force=force, fuse=fuse, allow_lossy=allow_lossy, grid=grid)
    if as_json:
        echo_json(r.to_dict())
        return
    if r.tensors and to == "gguf":
        header = ("tensor", "from", "shape", "type", "exact", "rel_l2")
        rows = [(t.name, t.source, "x".join(map(str, t.shape)), t.dtype, "yes" if t.exact else "NO",
                 "0" if t.exact else f"{t.rel_l2:.3e}") for t in r.tensors]
        widths = [max(len(h), *(len(x[i]) for x in rows)) for i, h in enumerate(header)]
        for x in [header, tuple("-" * w for w in widths), *rows]:
            click.echo("  ".join(c.ljust(w) for c, w in zip(x, widths)).rstrip())
    src = f"{r.format} {'fused in memory' if r.fused_in_memory else ''}".strip()
    click.echo(f"exported {r.source} ({r.model}, {src}) -> {r.path} [{to}"
               + (f", {r.dtype}" if r.dtype else "") + "]")
    inspect = f"; arbs inspect --bpw: {r.bpw_inspect:.3f}" if r.bpw_inspect else ""
    click.echo(f"{r.weights:,} weights, {_mb(r.file_bytes)}: {r.bpw_file:.3f} bits/weight of the file{inspect}")
    if r.xz_bytes is not None:
        gp, gb = PARAMETER_GOLF
        click.echo(f"xz (lzma -9e): {_mb(r.xz_bytes)}, {8 * r.xz_bytes / r.weights:.3f} bits/weight; "
                   f"parameter-golf: {gp / 1e6:.0f}M ternary params in {_mb(gb)} ({8 * gb / gp:.3f} bits/weight)")
    if r.tensors:
        bad = [t for t in r.tensors if not t.exact]
        click.echo("exact: every tensor read back bit for bit" if not bad else
                   f"LOSSY: {len(bad)} of {len(r.tensors)} tensors (max rel_l2 {max(t.rel_l2 for t in bad):.3e})")
    for n in r.notes:
        click.echo(f"note: {n}")
