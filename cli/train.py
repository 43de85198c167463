"""arbs train."""

import math
import sys

import click
from click.core import ParameterSource

from arbs import formats
from arbs.errors import ArbsError, ConfigError
from arbs.training.config import TrainConfig

from .common import arbs_errors, echo_json, progress_bar
from .options import model_option, rule_param_options, training_options

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
@click.option("--cuda-graph/--no-cuda-graph", default=_D.cuda_graph, show_default=True,
              help="--device cuda with carry/flip: replay each step (forward, backward, votes) from one CUDA graph; "
              "the same kernels and integers, without Python per layer.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document with the result on stdout.")
@arbs_errors
def train_cmd(fmt, as_json, **opts):
    """Train the built-in byte GPT (or a local Hugging Face model: --model); E1TM keeps integer state on disk.

    Writes checkpoints step_<N>/, LATEST, metrics.jsonl and loss.png into --out, shows a progress bar
    on stderr and, for E1TM formats, ends by measuring the fuse gap (validation loss after fuse minus
    before).
    """
    from arbs.plots import plot_run
    from arbs.training import train
    from arbs.training.config import resume_config

    ctx = click.get_current_context()
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
