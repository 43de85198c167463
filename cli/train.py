"""arbs train."""

import math
import os
import subprocess
import sys

import click
from click.core import ParameterSource

from arbs import formats
from arbs.errors import ArbsError, ConfigError
from arbs.training.config import TrainConfig

from .common import arbs_errors, echo_json, progress_bar
from .options import data_parallel_options, model_option, rule_param_options, training_options

_D = TrainConfig()


@click.command("train")
@click.option("--format", "fmt", default=_D.format, show_default=True,
              help=f"E1TM variant ({', '.join(formats.VARIANTS)}) or float baseline ({', '.join(formats.FLOAT_FORMATS)}).")
@click.option("--rule", default=None, help=f"E1TM update rule: {', '.join(formats.RULES)} [default {formats.DEFAULT_RULE}].")
@rule_param_options()
@training_options
@model_option
@click.option("--save-every", type=int, default=_D.save_every, show_default=True, help="Steps between checkpoints.")
@click.option("--keep", type=int, default=_D.keep, show_default=True, help="Keep the newest N checkpoints.")
@click.option("--out", default=_D.out, show_default=True, help="Run directory (checkpoints, metrics.jsonl, loss.png).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its newest checkpoint, bit-exact, with the "
              "options it was made with; given options may change only --steps, --horizon, the eval/save cadence, "
              "--keep, --threads, --device, --cuda-graph, --data.")
@click.option("--init", default=None, help="Model to start from: a float one (an fp32 run dir, .safetensors or torch state dict), converted "
              "to E1TM, or an E1TM run/checkpoint, whose integer state is taken as it is (fine-tuning).")
@click.option("--fuse-phase", type=float, default=None,
              help="E1TM: final fraction of steps trained with the scales fused into E and frozen (only trits "
              "learn), so the fused checkpoint is the trained one [default: 0.25 for flip, 0 for carry and average].")
@click.option("--fuse-grid", type=int, default=None,
              help="E1TM: at the fuse phase, fuse the scales onto a grid of this many weights per row (a multiple "
              "of gs) that share one E; 256 makes the trained model exactly what GGUF TQ1_0/TQ2_0 hold "
              "(docs/deploy.md) [default: one E per group].")
@click.option("--cuda-graph/--no-cuda-graph", default=_D.cuda_graph, show_default=True,
              help="--device cuda with carry/flip: replay each step (forward, backward, votes) from one CUDA graph; "
              "the same kernels and integers, without Python per layer.")
@data_parallel_options
@click.option("--micro-batch-votes", type=click.Choice(["mean", "sum", "accumulate"]),
              default=_D.micro_batch_votes, show_default=True,
              help="E1TM with several micro-batch slots per step: 'mean' votes on each slot's gradient, sums the "
                   "integer votes exactly (over ranks too: N ranks x M == 1 rank x N*M, bit for bit) and divides the "
                   "sum by the slot count with deterministic stochastic rounding; 'sum' applies the sum undivided; "
                   "'accumulate' sums the float gradients (all-reduced) and votes once.")
@click.option("--dist-timeout", type=int, default=_D.dist_timeout, show_default=True,
              help="torch.distributed: seconds a rank waits for a dead or hung one before it stops with an error.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document with the result on stdout.")
@arbs_errors
def train_cmd(fmt, as_json, nproc, **opts):
    """Train the built-in byte GPT (or a local Hugging Face model: --model); E1TM keeps integer state on disk.

    Writes checkpoints step_<N>/, LATEST, metrics.jsonl and loss.png into --out, shows a progress bar
    on stderr and, for E1TM formats, ends by measuring the fuse gap (validation loss after fuse minus
    before).
    """
    from arbs.plots import plot_run
    from arbs.training import train
    from arbs.training.config import resume_config

    ctx = click.get_current_context()
    if nproc is not None:
        sys.exit(_spawn(ctx, nproc))
    opts["format"] = fmt
    if opts["model"] is not None and ctx.get_parameter_source("preset") is ParameterSource.COMMANDLINE:
        raise ConfigError("--model and --preset are exclusive: --model trains the Hugging Face model in that "
                          "directory, --preset sizes the built-in GPT; give one of them")
    if opts["resume"]:  # the run as it was made; only the options given here may change it
        given = {k: v for k, v in opts.items()
                 if ctx.get_parameter_source("fmt" if k == "format" else k) is ParameterSource.COMMANDLINE}
        cfg = resume_config(opts["out"], **given)
    else:
        cfg = TrainConfig(**opts)
    unit = "token" if cfg.model else "byte"
    with progress_bar(total=cfg.steps, desc=f"{cfg.format}{':' + cfg.resolved_rule if cfg.resolved_rule else ''}") as bar:
        def on_step(rec):
            bar.n = rec["step"]
            bar.set_postfix(loss=f"{rec['train_loss']:.3f}", tok_s=f"{rec['tokens_per_s'] or 0:.0f}", refresh=False)
            bar.refresh()

        def on_eval(rec):
            bar.write(f"step {rec['step']:>6}  train {rec['train_loss']:.4f}  val {rec['val_loss']:.4f} nats/{unit} "
                      f"({rec['val_bpb']:.4f} bits/{unit})", file=sys.stderr)

        res = train(cfg, on_step=on_step, on_eval=on_eval)
    if os.environ.get("RANK", "0") != "0":  # data parallel: rank 0 reports, plots and prints
        return
    try:
        plot_run(res.run_dir)
    except ArbsError as e:  # the run is saved; a missing picture is worth a warning, not a failure
        click.echo(f"warning: loss.png not written: {e}", err=True)
    doc = {
        "run_dir": str(res.run_dir), "format": cfg.format, "rule": cfg.resolved_rule, "steps": res.steps,
        "final_train_loss": res.final_train_loss, "val_loss": res.val_loss, "val_bpb": res.val_bpb,
        "val_loss_fused": res.val_loss_fused, "fuse_gap": res.fuse_gap, "ms_per_step": res.ms_per_step,
        "interrupted": res.interrupted, "unit": unit,
    }
    if as_json:
        echo_json(doc)
        return
    click.echo(f"{'interrupted, saved' if res.interrupted else 'done'}: {res.steps} steps -> {res.run_dir}")
    click.echo(f"validation loss {res.val_loss:.4f} nats/{unit} ({res.val_bpb:.4f} bits/{unit})")
    if res.val_loss_fused is not None:
        click.echo(f"after fuse      {res.val_loss_fused:.4f} nats/{unit} (fuse gap {res.fuse_gap:+.4f})")
    if not math.isnan(res.ms_per_step):
        click.echo(f"{res.ms_per_step:.1f} ms/step; loss curve: {res.run_dir / 'loss.png'}")


def _spawn(ctx: click.Context, nproc: int) -> int:
    """``arbs train --nproc N ...``: run this command under ``torchrun --nproc-per-node N`` on this machine
    (without --nproc); returns torchrun's exit status."""
    if nproc < 1:
        raise ConfigError(f"--nproc must be an integer >= 1, got {nproc}")
    if "WORLD_SIZE" in os.environ:
        raise ConfigError("--nproc starts torchrun itself; under torchrun (WORLD_SIZE is set) leave it out")
    argv = []
    for p in ctx.command.params:
        if p.name == "nproc" or ctx.get_parameter_source(p.name) is not ParameterSource.COMMANDLINE:
            continue
        value = ctx.params[p.name]
        if p.is_flag and p.secondary_opts:  # --cuda-graph/--no-cuda-graph
            argv.append(p.opts[0] if value else p.secondary_opts[0])
        elif p.is_flag:
            if value:
                argv.append(p.opts[0])
        else:
            argv += [p.opts[0], str(value)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "-m", "arbs_cli",
           "train", *argv]
    click.echo(f"starting: {' '.join(cmd)}", err=True)
    return subprocess.call(cmd)
