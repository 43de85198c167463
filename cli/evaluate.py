"""arbs eval and arbs generate."""

import sys

import click

from .common import arbs_errors, echo_json


@click.command("eval")
@click.argument("ckpt")
@click.option("--data", default=None, help="Evaluate on this data's validation split instead of the run's own.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Sequences per batch.")
@click.option("--batches", type=int, default=8, show_default=True, help="Validation batches (fixed, evenly spaced windows).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="Where to run.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@arbs_errors
def eval_cmd(ckpt, data, batch_size, batches, device, as_json):
    """Validation loss (nats/byte and bits/byte) of a training, fused or float checkpoint.

    CKPT is a run directory (its newest committed checkpoint) or a step_<N> directory. A run of a
    Hugging Face model (train --model) is evaluated on its own tokenizer's ids: nats/token, bits/token.
    """
    from arbs.training.evaluate import eval_checkpoint

    r = eval_checkpoint(ckpt, data=data, batch_size=batch_size, max_batches=batches, device=device)
    doc = {"path": r.path, "kind": r.kind, "fused": r.fused, "step_counter": r.step, "val_loss": r.val_loss,
           "val_bpb": r.val_bpb, "val_bytes": r.val_bytes, "unit": r.unit}
    if as_json:
        echo_json(doc)
    else:
        click.echo(f"{r.path}: {r.val_loss:.4f} nats/{r.unit} ({r.val_bpb:.4f} bits/{r.unit})"
                   f"{' [fused]' if r.fused else ''}")


@click.command("generate")
@click.argument("ckpt")
@click.option("--prompt", default="def ", show_default=True, help="Text to continue (UTF-8).")
@click.option("--max-bytes", type=int, default=200, show_default=True,
              help="Bytes to sample (at most 1 MiB); printed as they come. Tokens for a run of a Hugging Face model.")
@click.option("--temperature", type=float, default=0.8, show_default=True, help="Sampling temperature; 0 = greedy.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="Where to run.")
@arbs_errors
def generate_cmd(ckpt, prompt, max_bytes, temperature, seed, device):
    """Sample bytes from a checkpoint's model after --prompt; prints prompt + continuation.

    A run of a Hugging Face model samples tokens and prints them decoded with its tokenizer."""
    from arbs.training.evaluate import generate

    raw = prompt.encode("utf-8", "surrogateescape")  # bytes the shell passed that are not UTF-8 stay bytes
    out = sys.stdout.buffer
    stream = generate(ckpt, raw, max_bytes=max_bytes, temperature=temperature, seed=seed, device=device)
    out.write(raw)
    for b in stream:  # the model's raw bytes, as they are sampled
        out.write(b)
        out.flush()
    out.write(b"\n")
    out.flush()
