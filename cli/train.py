"""arbs train."""

import math
import sys

import click

from arbs import formats as F
from arbs.train import FLIP_DEFAULTS, FLOAT_FORMATS, TrainConfig, train

from .common import arbs_errors, echo_json, progress_bar

_D = TrainConfig()


@click.command("train")
@click.option("--format", "fmt", default=_D.format, show_default=True,
              help=f"E1TM variant ({', '.join(F.VARIANTS)}) or float baseline ({', '.join(FLOAT_FORMATS)}).")
@click.option("--rule", default=None, help="E1TM update rule: average (the design's), carry, flip. "
              "Default: flip (also with --init: measured better than carry there, docs/training.md).")
@click.option("--K", "K", type=int, default=None,
              help=f"carry/flip: Xi = corr_accum/(K*gs) [default {F.DEFAULT_PARAMS['K']}].")
@click.option("--theta", type=int, default=None,
              help=f"flip: counter threshold that moves a trit [default {FLIP_DEFAULTS['theta']}].")
@click.option("--gain", type=int, default=None,
              help="flip: a weight's vote is -sign(g) times the stochastic rounding of min(vote-max, "
              f"gain*m(step)*|g|/rms(g of its row)); 0 = every weight votes -sign(g) each step [default {FLIP_DEFAULTS['gain']}].")
@click.option("--vote-max", type=int, default=None,
              help=f"flip with --gain > 0: largest counter step of one vote [default {FLIP_DEFAULTS['vote_max']}].")
@click.option("--horizon", type=int, default=None,
              help="flip: step where the vote schedule m (5% warmup, cosine to 0) ends; 0 = constant "
              "[default: --steps; on --resume the run's own; a larger one on --resume extends a finished run].")
@click.option("--preset", default=_D.preset, show_default=True, help="Built-in model size: tiny (CPU), small, base (GPU).")
@click.option("--data", default=None, help="Text file, directory of text files, or uint8 .npy. Default: the Python standard library's *.py sources.")
@click.option("--steps", type=int, default=_D.steps, show_default=True, help="Total optimizer steps (a resumed run trains up to this).")
@click.option("--batch-size", type=int, default=_D.batch_size, show_default=True, help="Sequences per step.")
@click.option("--context", type=int, default=None, help="Bytes per sequence (default: the preset's).")
@click.option("--seed", type=int, default=_D.seed, show_default=True, help="Seed of init, data order and every random choice.")
@click.option("--eval-every", type=int, default=_D.eval_every, show_default=True, help="Steps between validation evaluations.")
@click.option("--eval-batches", type=int, default=_D.eval_batches, show_default=True, help="Validation batches per evaluation.")
@click.option("--save-every", type=int, default=_D.save_every, show_default=True, help="Steps between checkpoints.")
@click.option("--keep", type=int, default=_D.keep, show_default=True, help="Keep the newest N checkpoints.")
@click.option("--out", default=_D.out, show_default=True, help="Run directory (checkpoints, metrics.jsonl, loss.png).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its LATEST checkpoint (bit-exact).")
@click.option("--init", default=None, help="Float model to start from (an fp32 run dir, .safetensors or torch state dict), converted to E1TM.")
@click.option("--fuse-phase", type=float, default=None,
              help="E1TM: final fraction of steps trained with the scales fused into E and frozen (only trits "
              "learn), so the fused checkpoint is the trained one [default: 0.25 for flip, 0 for carry and average].")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=_D.device, show_default=True, help="Where to train.")
@click.option("--cuda-graph/--no-cuda-graph", default=_D.cuda_graph, show_default=True,
              help="--device cuda with carry/flip: replay each step (forward, backward, votes) from one CUDA graph; "
              "the same kernels and integers, without Python per layer.")
@click.option("--lr", type=float, default=_D.lr, show_default=True, help="Float baselines: AdamW peak learning rate (cosine to 10%).")
@click.option("--weight-decay", type=float, default=_D.weight_decay, show_default=True, help="Float baselines: AdamW weight decay.")
@click.option("--warmup", type=int, default=_D.warmup, show_default=True, help="Float baselines: linear warmup steps.")
@click.option("--baseline-theta", type=float, default=_D.baseline_theta, show_default=True,
              help="learned-s/factorized threshold, as a multiple of the tensor's mean|W|.")
@click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document with the result on stdout.")
@arbs_errors
def train_cmd(fmt, as_json, **opts):
    """Train the built-in byte GPT; E1TM formats keep only integer state on disk.

    Writes checkpoints step_<N>/, LATEST, metrics.jsonl and loss.png into --out, shows a progress bar
    on stderr and, for E1TM formats, ends by measuring the fuse gap (validation loss after fuse minus
    before).
    """
    cfg = TrainConfig(format=fmt, **opts)
    with progress_bar(total=cfg.steps, desc=f"{cfg.format}{':' + cfg.resolved_rule if cfg.resolved_rule else ''}") as bar:
        def on_step(rec):
            bar.n = rec["step"]
            bar.set_postfix(loss=f"{rec['train_loss']:.3f}", tok_s=f"{rec['tokens_per_s'] or 0:.0f}", refresh=False)
            bar.refresh()

        def on_eval(rec):
            bar.write(f"step {rec['step']:>6}  train {rec['train_loss']:.4f}  val {rec['val_loss']:.4f} nats/byte "
                      f"({rec['val_bpb']:.4f} bits/byte)", file=sys.stderr)

        res = train(cfg, on_step=on_step, on_eval=on_eval)
    doc = {
        "run_dir": str(res.run_dir), "format": cfg.format, "rule": cfg.resolved_rule, "steps": res.steps,
        "final_train_loss": res.final_train_loss, "val_loss": res.val_loss, "val_bpb": res.val_bpb,
        "val_loss_fused": res.val_loss_fused, "fuse_gap": res.fuse_gap, "ms_per_step": res.ms_per_step,
        "interrupted": res.interrupted,
    }
    if as_json:
        echo_json(doc)
        return
    click.echo(f"{'interrupted, saved' if res.interrupted else 'done'}: {res.steps} steps -> {res.run_dir}")
    click.echo(f"validation loss {res.val_loss:.4f} nats/byte ({res.val_bpb:.4f} bits/byte)")
    if res.val_loss_fused is not None:
        click.echo(f"after fuse      {res.val_loss_fused:.4f} nats/byte (fuse gap {res.fuse_gap:+.4f})")
    if not math.isnan(res.ms_per_step):
        click.echo(f"{res.ms_per_step:.1f} ms/step; loss curve: {res.run_dir / 'loss.png'}")
