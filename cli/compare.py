"""arbs compare."""

import click

from arbs.compare import DEFAULT_ENTRIES, CompareConfig, compare

from .common import arbs_errors, echo_json, progress_bar

_D = CompareConfig()


_HELP = f"""Train schemes side by side (same model, data order, seed, steps) and write a table with plots.

ENTRIES are format[:rule][@init], e.g. fp32 absmean E1TM32:flip E1TM32:carry@init (the @init entries
start from the fp32 entry, trained first). Default: {" ".join(DEFAULT_ENTRIES)}. Re-running the same
command resumes an interrupted compare.
"""


@click.command("compare", help=_HELP)
@click.argument("entries", nargs=-1)
@click.option("--out", default=_D.out, show_default=True, help="Directory for the runs, compare.md, compare.json and PNG plots.")
@click.option("--preset", default=_D.preset, show_default=True, help="Built-in model size for every entry.")
@click.option("--data", default=None, help="Text file, directory or uint8 .npy (default: the Python stdlib corpus).")
@click.option("--steps", type=int, default=_D.steps, show_default=True, help="Step budget of every entry.")
@click.option("--batch-size", type=int, default=_D.batch_size, show_default=True, help="Sequences per step.")
@click.option("--context", type=int, default=None, help="Bytes per sequence (default: the preset's).")
@click.option("--seed", type=int, default=_D.seed, show_default=True, help="One seed for init and data order of all entries.")
@click.option("--eval-every", type=int, default=_D.eval_every, show_default=True, help="Steps between validation evaluations.")
@click.option("--eval-batches", type=int, default=_D.eval_batches, show_default=True, help="Validation batches per evaluation.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=_D.device, show_default=True, help="Where to train.")
@click.option("--lr", type=float, default=_D.lr, show_default=True, help="Float baselines: AdamW peak learning rate.")
@click.option("--weight-decay", type=float, default=_D.weight_decay, show_default=True, help="Float baselines: AdamW weight decay.")
@click.option("--warmup", type=int, default=_D.warmup, show_default=True, help="Float baselines: warmup steps.")
@click.option("--baseline-theta", type=float, default=_D.baseline_theta, show_default=True, help="learned-s/factorized threshold (x mean|W|).")
@click.option("--threads", type=int, default=None, help="torch CPU threads per entry.")
@click.option("--json", "as_json", is_flag=True, help="Print the table as one JSON document on stdout.")
@arbs_errors
def compare_cmd(entries, as_json, **opts):
    cfg = CompareConfig(entries=tuple(entries) or DEFAULT_ENTRIES, **opts)
    with progress_bar(total=cfg.steps) as bar:
        def on_entry(e, i, n):
            bar.reset(total=cfg.steps)
            bar.set_description(f"[{i + 1}/{n}] {e.label}")

        def on_step(step):
            bar.n = step
            bar.refresh()

        rows = compare(cfg, on_entry=on_entry, on_step=on_step)
    if as_json:
        echo_json([{k: v for k, v in r.__dict__.items() if k != "curve"} for r in rows])
        return
    from arbs.compare import render_markdown

    click.echo(render_markdown(cfg, rows))
    click.echo(f"table: {cfg.out}/compare.md; plots: {cfg.out}/val_curves.png, {cfg.out}/final_loss.png")
