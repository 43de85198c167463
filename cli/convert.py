"""arbs convert."""

from __future__ import annotations

import math

import click

from arbs import formats
from .common import arbs_errors, echo_json
from .options import rule_param_options


@click.command("convert")
@click.argument("float_ckpt")
@click.option("--format", "fmt", default=formats.DEFAULT_VARIANT, show_default=True,
              help=f"E1TM variant: {', '.join(formats.VARIANTS)}.")
@click.option("--rule", default=formats.DEFAULT_RULE, show_default=True,
              help=f"Update rule the checkpoint will train with: {', '.join(formats.RULES)}.")
@rule_param_options()
@click.option("--include", multiple=True, metavar="PAT",
              help="Convert only tensors whose name matches this fnmatch pattern (repeatable), e.g. '*.weight'.")
@click.option("--exclude", multiple=True, metavar="PAT",
              help="Skip tensors whose name matches this fnmatch pattern (repeatable; applied after --include).")
@click.option("--out", required=True, metavar="RUN",
              help="Run directory to write the converted checkpoint into (as step_0).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document with the report on stdout.")
@arbs_errors
def convert_cmd(float_ckpt, fmt, rule, include, exclude, out, as_json, **params):
    """Convert float weights to an E1TM training checkpoint.

    FLOAT_CKPT is a .safetensors file or a torch state dict (.pt/.pth/.bin/.ckpt). Every floating tensor with at least one dimension is converted unless --include/--exclude say
    otherwise. Tensors that are not converted are not stored (E1TM checkpoints are integer only);
    they are listed in the report. Prints the relative L2 error ||W_eff - W|| / ||W|| per tensor.

    FLOAT_CKPT may instead be a local Hugging Face causal-LM directory (config.json + model.safetensors;
    Llama, Mistral, Qwen2, GPT-2): its norm gains are folded into the layers that read them, every Linear
    and Embedding weight is converted, and its biases stay float in the checkpoint's float part
    (docs/models.md). arbs eval/generate then work on the result.
    """
    from pathlib import Path

    from arbs.convert import KEPT_FLOAT_REASON, convert_file, convert_hf_dir

    if Path(float_ckpt).is_dir():
        report = convert_hf_dir(float_ckpt, out, format=fmt, rule=rule, include=list(include),
                                exclude=list(exclude), **params)
    else:
        report = convert_file(float_ckpt, out, format=fmt, rule=rule, include=list(include),
                              exclude=list(exclude), **params)
    if as_json:
        echo_json(report.to_dict())
        return
    rows = [(t.name, "x".join(map(str, t.shape)), f"{t.rel_l2:.4f}", str(t.zero_groups), str(t.clipped))
            for t in report.tensors]
    header = ("tensor", "shape", "rel_l2", "zero_groups", "clipped")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        click.echo("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    params = ", ".join(f"{k}={v}" for k, v in report.rule_params.items())
    click.echo(f"{len(report.tensors)} tensors, {report.weights} weights -> {report.format} rule {report.rule}"
               f"{f' ({params})' if params else ''}; overall rel_l2 {report.rel_l2:.4f}")
    kept = [s for s in report.skipped if s.reason == KEPT_FLOAT_REASON]
    dropped = [s for s in report.skipped if s.reason != KEPT_FLOAT_REASON]
    if kept:
        n = sum(math.prod(s.shape) for s in kept)
        click.echo(f"kept float and frozen, in the checkpoint's float part: {len(kept)} tensors, {n} values "
                   f"({n / max(report.weights, 1):.4%} of the weights)")
    if dropped:
        click.echo(f"skipped {len(dropped)} (not stored):")
        for s in dropped:
            click.echo(f"  {s.name} {'x'.join(map(str, s.shape)) or 'scalar'} {s.dtype}: {s.reason}")
    for n in report.notes:
        click.echo(f"note: {n}")
    click.echo(f"saved {report.path}")
