"""TrainConfig: everything a training run depends on, validated on construction and recorded in the run.

Defaults live here only; the CLI maps options one-to-one. Imports no torch (``arbs train --help`` is fast).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

from .. import formats
from ..errors import ConfigError


SEED_LIMIT = 1 << 63  # seeds are 0 .. 2**63-1 (numpy's SeedSequence and torch.manual_seed both take them)
# Options a resumed run may change: schedules and cadence, where and how it runs (not what it trains).
# Float baselines a Hugging Face model (--model) trains: fp32 (AdamW on the model itself) and absmean (BitNet-style
# QAT of its Linear and Embedding layers); the E1TM formats all.
HF_FLOAT_FORMATS = ("fp32", "absmean")
RESUMABLE = ("steps", "horizon", "eval_every", "eval_batches", "save_every", "keep", "threads", "device",
             "cuda_graph", "data", "out", "resume", "micro_batches", "dist_timeout")
MICRO_BATCH_VOTES = ("mean", "sum", "accumulate")  # how a step's micro-batches vote (docs/distributed.md)
DEFAULT_DIST_TIMEOUT_S = 300  # arbs.distributed.DEFAULT_TIMEOUT_S (this module imports no torch)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _check_int(name: str, v, lo: int, limit: int | None = None) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (limit is not None and v >= limit):
        bound = f"{lo} .. {limit - 1}" if limit is not None else f">= {lo}"
        raise ConfigError(f"--{name.replace('_', '-')} must be an integer {bound}, got {v!r}")


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: no estimate, no refusal
        return None


def activation_bytes(cfg: TrainConfig) -> int:
    """A lower bound on the float32 activations one training step keeps for backward: about 16 values
    per layer per token per channel plus the attention probabilities if they are materialized
    (n_head * context^2 per sequence and layer). Used to refuse a run that cannot fit before it starts."""
    m = cfg.model_config()
    tokens = cfg.batch_size * m.context
    per_layer = 16 * tokens * m.d_model + cfg.batch_size * m.n_head * m.context * m.context
    return 4 * m.n_layer * per_layer


def _check_memory(cfg: TrainConfig) -> None:
    if cfg.device != "cpu" or cfg.model is not None:  # a Hugging Face model: _check_model estimates it
        return
    need, have = activation_bytes(cfg), _physical_memory()
    if have is not None and need > have:
        m = cfg.model_config()
        raise ConfigError(
            f"--context {m.context} with --batch-size {cfg.batch_size} on preset {cfg.preset!r} needs at least "
            f"{need / 2**30:.1f} GiB of activations per step; this machine has {have / 2**30:.1f} GiB. "
            "Use a smaller --context or --batch-size"
        )


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything a training run depends on. Defaults live here only; the CLI maps options one-to-one."""

    format: str = formats.DEFAULT_VARIANT
    rule: str | None = None  # None: formats.DEFAULT_RULE
    # rule parameters; None: the defaults of formats.PARAMS, horizon --steps (on --resume: the run's own)
    K: int | None = None
    theta: int | None = None
    gain: int | None = None  # flip's stochastic vote gain (0 = plain sign votes)
    horizon: int | None = None  # flip's schedule end; None: --steps
    vote_max: int | None = None  # flip: largest counter step of one vote
    vote_norm: int | None = None  # flip: the votes' rms over 0 = the row, 1 = the tensor
    reset: int | None = None  # flip: a moved trit's counter starts at -reset*direction
    preset: str = "tiny"
    # a local Hugging Face causal-LM directory (config.json, model.safetensors, tokenizer.json) to train
    # instead of the built-in GPT; exclusive with --preset (arbs.models.hf)
    model: str | None = None
    data: str | None = None  # None: the built-in Python-stdlib corpus
    steps: int = 1000
    batch_size: int = 16
    context: int | None = None  # None: the preset's context
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 200
    keep: int | None = 2
    out: str = "runs/e1tm"
    resume: bool = False
    init: str | None = None  # a float model (converted) or an E1TM run (its integers) to start from; E1TM only
    # E1TM: final fraction of steps trained with the scales fused into E and frozen (only trits learn),
    # so the fused checkpoint is the trained one. None: 0.25 for flip, 0 for carry/average (nothing of
    # theirs would learn in it)
    fuse_phase: float | None = None
    # E1TM: enter the fuse phase onto a coarser scale grid: every fuse_grid consecutive weights of a row share
    # one E (256: GGUF's TQ1_0/TQ2_0 hold the trained model exactly; docs/deploy.md). None: one E per group.
    fuse_grid: int | None = None
    device: str = "cpu"
    cuda_graph: bool = True  # --device cuda, carry/flip: capture each step in a CUDA graph (same integers, less Python)
    # float baselines (AdamW on latent float weights)
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup: int = 50
    baseline_threshold: float = 0.5  # learned-s/factorized: trits are 0 below this multiple of mean|W|
    threads: int | None = None
    # micro-batches per step on each rank: the global batch (--batch-size) is split into world size x this many
    # slots. None: 1 for a new run; on --resume, the run's slot count divided by the world size.
    micro_batches: int | None = None
    # mean: each micro-batch votes into integer counts, summed exactly (over the ranks: integer all-reduce), divided
    # by the slot count with deterministic stochastic rounding and applied once per step; sum: the same without the
    # division; accumulate: the micro-batches' float gradients are summed (all-reduced) and voted on once
    micro_batch_votes: str = "mean"
    dist_timeout: int = DEFAULT_DIST_TIMEOUT_S  # torch.distributed: seconds a collective waits for a dead or hung rank

    def __post_init__(self):
        for name, lo in (("steps", 1), ("batch_size", 1), ("eval_every", 1), ("save_every", 1), ("eval_batches", 1),
                         ("seed", 0), ("warmup", 0)):
            _check_int(name, getattr(self, name), lo, SEED_LIMIT if name == "seed" else None)
        _check_int("dist_timeout", self.dist_timeout, 1)
        for name, lo in (("context", 2), ("keep", 1), ("threads", 1), ("micro_batches", 1)):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), lo)
        for name in ("lr", "weight_decay", "baseline_threshold"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v!r}")
        formats.check_format(self.format)
        if formats.is_e1tm(self.format):
            self.rule_params()
        elif self.rule is not None:
            raise ConfigError(f"--rule applies to E1TM formats only; {self.format!r} is a float baseline")
        elif self.init is not None:
            raise ConfigError("--init starts an E1TM run from another model; use it with an E1TM --format")
        from ..models.config import DEFAULT_PRESET, get_preset

        get_preset(self.preset)  # raises with the list of presets
        if self.model is not None:
            self._check_model(DEFAULT_PRESET)
        if self.fuse_phase is not None and not (isinstance(self.fuse_phase, (int, float))
                                                and 0.0 <= self.fuse_phase <= 1.0):
            raise ConfigError(f"--fuse-phase is a fraction of the steps, 0..1; got {self.fuse_phase!r}")
        if self.fuse_grid is not None:
            self._check_fuse_grid()
        if self.micro_batch_votes not in MICRO_BATCH_VOTES:
            raise ConfigError(f"--micro-batch-votes must be one of {', '.join(MICRO_BATCH_VOTES)}, "
                              f"got {self.micro_batch_votes!r}")
        if self.micro_batches is not None and self.batch_size % self.micro_batches:
            raise ConfigError(f"--batch-size {self.batch_size} does not split into --micro-batches "
                              f"{self.micro_batches}; use a multiple of {self.micro_batches}")
        if (self.device == "cuda" and formats.is_e1tm(self.format) and (self.micro_batches or 1) > 1
                and self.micro_batch_votes != "accumulate"):
            raise ConfigError(f"--micro-batches > 1 with --micro-batch-votes {self.micro_batch_votes} runs on the CPU "
                              "only in this version; "
                              "on a GPU use --micro-batch-votes accumulate")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not _cuda_available():
            raise ConfigError("--device cuda: no CUDA GPU is visible to torch on this machine; use --device cpu")
        _check_memory(self)

    def _check_model(self, default_preset: str) -> None:
        """--model: a string, without --preset, E1TM or a float format of HF_FLOAT_FORMATS, no --init; for a
        new run, the directory is read and checked now (config.json, a supported model_type, weights, tokenizer,
        memory), before anything is written. A resumed run uses what it recorded and never reads the directory again."""
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError(f"--model must be a directory path, got {self.model!r}")
        if self.preset != default_preset:
            raise ConfigError(f"--model and --preset {self.preset!r} are exclusive: --model trains the Hugging Face "
                              "model in that directory, --preset sizes the built-in GPT; give one of them")
        if not formats.is_e1tm(self.format) and self.format not in HF_FLOAT_FORMATS:
            raise ConfigError(f"--model trains E1TM formats and the float baselines {', '.join(HF_FLOAT_FORMATS)}; "
                              f"{self.format!r} is not one of them")
        if self.init is not None:
            raise ConfigError("--model starts from the model's own weights; --init does not apply")
        if not self.resume:
            from ..models import hf  # torch, and transformers on first use: only for --model

            src = hf.read_source(self.model)
            hf.run_record(src, context=self.context)  # --context within the model's positions
            hf.check_memory(src, batch_size=self.batch_size, context=self.context)

    def _check_fuse_grid(self) -> None:
        g = self.fuse_grid
        if not formats.is_e1tm(self.format):
            raise ConfigError(f"--fuse-grid applies to E1TM formats; {self.format!r} is a float baseline")
        try:
            formats.grid_groups(formats.variant_gs(self.format), g)
        except ConfigError as e:
            raise ConfigError(f"--fuse-grid {g!r} ({self.format}): {e}") from None
        if self.resolved_fuse_phase == 0:
            raise ConfigError(f"--fuse-grid fuses the scales when the fuse phase starts, but rule "
                              f"{self.resolved_rule!r} runs without one here; add --fuse-phase (e.g. 0.25)")

    @property
    def resolved_fuse_phase(self) -> float:
        if self.fuse_phase is not None:
            return self.fuse_phase
        return 0.25 if self.resolved_rule == "flip" else 0.0

    def given_rule_params(self) -> dict[str, int]:
        """The rule parameters set explicitly (not None)."""
        return {k: getattr(self, k) for k in formats.PARAMS if getattr(self, k) is not None}

    def rule_params(self) -> dict[str, int]:
        """The E1TM rule's integer parameters: formats.PARAMS defaults, flip's horizon = --steps."""
        rule = self.resolved_rule
        given = self.given_rule_params()
        if rule == "flip":
            given = {"horizon": self.steps} | given
        return formats.rule_params(rule, **given)

    @property
    def resolved_rule(self) -> str | None:
        if not formats.is_e1tm(self.format):
            return None
        return self.rule or formats.DEFAULT_RULE

    def model_config(self):
        """The GPTConfig of --preset, with --context if given."""
        from ..models.config import get_preset

        cfg = get_preset(self.preset)
        return dataclasses.replace(cfg, context=self.context) if self.context else cfg

    def recorded(self) -> dict:
        """The whole config as the run records it (``meta["config"]``): every option, the rule and its
        parameters and the fuse phase resolved to the values the run uses; not ``out``/``resume``."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("out", "resume")}
        if self.model is None:  # a built-in GPT run records what it did before --model existed
            del d["model"]
        # how a step is spread over ranks and micro-batches is the launch's, not the run's: the run records its
        # slot count in meta["micro_batch_slots"]; the vote rule only when not the default
        del d["micro_batches"], d["dist_timeout"]
        if self.micro_batch_votes == "mean":  # runs recorded before "mean" existed: see resume_config
            del d["micro_batch_votes"]
        if self.fuse_grid is None:  # runs recorded before --fuse-grid existed had none
            del d["fuse_grid"]
        if formats.is_e1tm(self.format):
            d.update(self.rule_params(), rule=self.resolved_rule, fuse_phase=self.resolved_fuse_phase)
        return d

    @classmethod
    def resumed(cls, out, recorded: dict, **given) -> TrainConfig:
        """The config of the run recorded as ``recorded`` (``meta["config"]`` of its checkpoint),
        continued in ``out``: options in ``given`` may change only what RESUMABLE names; any other that
        differs from the run's is refused, with both values."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(given) - fields)
        if unknown:
            raise ConfigError(f"unknown training option(s) {unknown}")
        base = {"model": None} | {k: v for k, v in recorded.items() if k in fields}  # a GPT run: model None
        refused = [f"--{k.replace('_', '-')} {given[k]!r} (the run's: {base.get(k)!r})"
                   for k in sorted(given) if k not in RESUMABLE and k in base and given[k] != base[k]]
        if refused:
            raise ConfigError(f"--resume {out}: these options differ from the run's own and may not change on "
                              f"resume: {'; '.join(refused)}. Resume without them, or start a new --out")
        return cls(**(base | given | {"out": str(out), "resume": True}))

    def lr_at(self, step: int) -> float:
        """Float baselines: AdamW's learning rate at ``step`` (linear warmup, cosine to 10%)."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        frac = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def run_meta(cfg: TrainConfig, corpus_info: dict, hf: dict | None = None) -> dict:
    """What a run records in every checkpoint's ``meta``: its identity (IDENTITY_KEYS) and its settings.

    ``hf``: a Hugging Face run's ``{"model": identity, "hf": record}`` (arbs.models.hf.run_record): they
    replace the built-in GPT's ``model`` and ``preset``."""
    m = {
        "format": cfg.format,
        "rule": cfg.resolved_rule,
        "preset": cfg.preset,
        "model": dataclasses.asdict(cfg.model_config()),
        "data": corpus_info,
        "data_path": cfg.data,
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
        "init": cfg.init,
        "config": cfg.recorded(),
    }
    if hf is not None:
        m.update(model=hf["model"], hf=hf["hf"], preset=None)
    if formats.is_e1tm(cfg.format):
        m["rule_params"] = cfg.rule_params()
    else:
        m.update(lr=cfg.lr, weight_decay=cfg.weight_decay, warmup=cfg.warmup, steps=cfg.steps,
                 baseline_threshold=cfg.baseline_threshold, gs=32)
    return m


# micro_batch_slots / micro_batch_votes: recorded only when a step has several slots (None: one)
IDENTITY_KEYS = ("format", "rule", "rule_params", "preset", "model", "seed", "batch_size", "data",
                 "micro_batch_slots", "micro_batch_votes")
# Rule parameters a resume may change: a schedule, not the model (--resume --steps N --horizon N extends a run).
RESUME_MAY_CHANGE = ("horizon",)


def check_resume(ck, meta: dict, run_dir: Path) -> None:
    """ConfigError unless checkpoint ``ck`` was made by a run with the identity ``meta`` asks for."""
    for k in IDENTITY_KEYS:
        # rule_params as the store read them: complete, with the defaults of parameters added since
        got = dict(ck.rule_params) if k == "rule_params" and ck.rule is not None else ck.meta.get(k)
        want = meta.get(k)
        if k == "rule_params" and isinstance(got, dict) and isinstance(want, dict):
            differs = any(got.get(p) != want.get(p) for p in got.keys() | want.keys() if p not in RESUME_MAY_CHANGE)
        else:
            differs = got != want
        if differs:
            raise ConfigError(
                f"--resume {run_dir}: the run was made with {k}={got!r} but this command asks for "
                f"{want!r}; resume with the run's own options or start a new --out"
            )


def resume_config(run_dir, **given) -> TrainConfig:
    """The TrainConfig that continues the run in ``out`` as it was made: the config its newest
    checkpoint recorded, with the options in ``given`` (those the user set explicitly) applied where
    they may change (RESUMABLE); see TrainConfig.resumed."""
    from .. import store

    given = {k: v for k, v in given.items() if k not in ("out", "resume")}
    if not _has_checkpoint(run_dir, store):  # a crash before the first commit: the run starts over
        return TrainConfig(**given, out=str(run_dir), resume=True)
    meta = store.open_checkpoint(run_dir).meta
    recorded = meta.get("config") if isinstance(meta.get("config"), dict) else _legacy_recorded(meta)
    if "micro_batch_votes" in meta:  # a run of several slots records its vote rule (older ones left "sum" out)
        recorded = recorded | {"micro_batch_votes": meta["micro_batch_votes"]}
    return TrainConfig.resumed(run_dir, recorded, **given)


def _has_checkpoint(run_dir, store) -> bool:
    return Path(run_dir).is_dir() and bool(store.list_checkpoints(run_dir))


def _legacy_recorded(meta: dict) -> dict:
    """What a run made before runs recorded their whole config can tell of it (its identity keys)."""
    d = {k: meta[k] for k in ("format", "rule", "preset", "seed", "batch_size", "init") if k in meta}
    d["data"] = meta.get("data_path")
    d.update(meta.get("rule_params") or {})
    model = meta.get("model") or {}
    if "context" in model:
        d["context"] = model["context"]
    for k in ("lr", "weight_decay", "warmup", "steps"):
        if k in meta:
            d[k] = meta[k]
    return d
