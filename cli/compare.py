"""arbs compare."""

import click

from arbs.compare import DEFAULT_ENTRIES, MODEL_ENTRIES, CompareConfig
from arbs.errors import ArbsError

from .common import arbs_errors, echo_json, progress_bar
from .options import model_option, training_options

_D = CompareConfig()


_HELP = f"""Train schemes side by side (same model, data order, seed, steps) and write a table with plots.

ENTRIES are format[:rule][,param=value...][@init], e.g. fp32 absmean E1TM32:flip E1TM32:flip@init
E1TM32:flip,K=64,reset=8 (rule parameters as the train options of that name; the others keep their
defaults; the @init entries start from the fp32 entry, trained first). Default: {" ".join(DEFAULT_ENTRIES)}.
Re-running the same command resumes an interrupted compare.

With --model HF_DIR every entry trains that local Hugging Face model from its own weights (float entries:
fp32, absmean; any E1TM rule; no @init). Default then: {" ".join(MODEL_ENTRIES)}.
"""


@click.command("compare", help=_HELP)
@click.argument("entries", nargs=-1)
@click.option("--out", default=_D.out, show_default=True, help="Directory for the runs, compare.md, compare.json and PNG plots.")
@training_options
@model_option
@click.option("--json", "as_json", is_flag=True, help="Print the table as one JSON document on stdout.")
@arbs_errors
def compare_cmd(entries, as_json, **opts):
    from arbs.compare import compare, render_markdown
    from arbs.plots import plot_compare

    cfg = CompareConfig(entries=tuple(entries) or None, **opts)
    with progress_bar(total=cfg.steps) as bar:
        def on_entry(e, i, n):
            bar.reset(total=cfg.steps)
            bar.set_description(f"[{i + 1}/{n}] {e.label}")

        def on_step(step):
            bar.n = step
            bar.refresh()

        rows = compare(cfg, on_entry=on_entry, on_step=on_step)
    try:
        plot_compare(rows, cfg.out)
    except ArbsError as e:  # the table is written; a missing picture is worth a warning, not a failure
        click.echo(f"warning: plots not written: {e}", err=True)
    if as_json:
        echo_json([{k: v for k, v in r.__dict__.items() if k != "curve"} for r in rows])
        return
    click.echo(render_markdown(cfg, rows))
    click.echo(f"table: {cfg.out}/compare.md; plots: {cfg.out}/val_curves.png, {cfg.out}/final_loss.png")
