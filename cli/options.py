"""Options declared once and shared by commands: the rule parameters (from formats.PARAMS), the
training options of ``train`` and ``compare`` (defaults from TrainConfig), and ``train``'s data-parallel ones."""

from __future__ import annotations

import click

from arbs import formats
from arbs.training.config import TrainConfig

_D = TrainConfig()


def _apply(f, decorators):
    for d in reversed(decorators):
        f = d(f)
    return f


def rule_param_options(names=tuple(formats.PARAMS)):
    """One ``--<name>`` option per rule parameter of ``formats.PARAMS`` (default: the table's)."""
    def flag(n):
        return "--K" if n == "K" else "--" + n.replace("_", "-")

    def deco(f):
        return _apply(f, [
            click.option(flag(n), n, type=int, default=None,
                         help=f"{formats.PARAMS[n].summary} [default {formats.PARAMS[n].default}"
                              + ("; arbs train: --steps, on --resume the run's own]" if n == "horizon" else "]"))
            for n in names
        ])
    return deco


_TRAINING = [
    click.option("--preset", default=_D.preset, show_default=True, help="Built-in model size: tiny (CPU), small, base (GPU)."),
    click.option("--data", default=None, help="Text file, directory of text files, uint8 .npy, or python:all (every *.py/*.md/*.txt of this Python installation, site-packages included). Default: the Python standard library's *.py sources."),
    click.option("--steps", type=int, default=_D.steps, show_default=True, help="Total optimizer steps (a resumed run trains up to this)."),
    click.option("--batch-size", type=int, default=_D.batch_size, show_default=True, help="Sequences per step."),
    click.option("--context", type=int, default=None, help="Bytes per sequence (default: the preset's)."),
    click.option("--seed", type=int, default=_D.seed, show_default=True, help="Seed of init, data order and every random choice."),
    click.option("--eval-every", type=int, default=_D.eval_every, show_default=True, help="Steps between validation evaluations."),
    click.option("--eval-batches", type=int, default=_D.eval_batches, show_default=True, help="Validation batches per evaluation."),
    click.option("--device", type=click.Choice(["cpu", "cuda"]), default=_D.device, show_default=True, help="Where to train."),
    click.option("--lr", type=float, default=_D.lr, show_default=True, help="Float baselines: AdamW peak learning rate (cosine to 10%)."),
    click.option("--weight-decay", type=float, default=_D.weight_decay, show_default=True, help="Float baselines: AdamW weight decay."),
    click.option("--warmup", type=int, default=_D.warmup, show_default=True, help="Float baselines: linear warmup steps."),
    click.option("--baseline-threshold", type=float, default=_D.baseline_threshold, show_default=True,
                 help="learned-s/factorized threshold, as a multiple of the tensor's mean|W|."),
    click.option("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)."),
]


def training_options(f):
    """The options a training run and a compare share, defaults from TrainConfig."""
    return _apply(f, _TRAINING)


def model_option(f):
    """``--model HF_DIR``: a local Hugging Face causal LM to train instead of the built-in GPT."""
    return click.option(
        "--model", default=None, metavar="HF_DIR",
        help="Train the Hugging Face causal LM in this local directory (config.json, model.safetensors, "
             "tokenizer.json; Llama, Mistral, Qwen2, GPT-2) instead of the built-in GPT: norms folded, weights "
             "converted to E1TM, data tokenized with its tokenizer. Not with --preset. See docs/models.md.")(f)


def data_parallel_options(f):
    """``--micro-batches M`` and ``--nproc N`` (arbs train; docs/distributed.md)."""
    return _apply(f, [
        click.option("--micro-batches", type=int, default=None,
                     help="Micro-batches per step on each rank: --batch-size is split into world size x M slots, each "
                          "voting on its own (--micro-batch-votes). [default: 1; on --resume, what keeps the run's "
                          "slot count at this world size]"),
        click.option("--nproc", type=int, default=None,
                     help="Start N data-parallel processes on this machine (torchrun --nproc-per-node N -m arbs_cli "
                          "train ...; gloo on the CPU, NCCL on GPUs)."),
    ])
