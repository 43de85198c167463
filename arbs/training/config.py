"""TrainConfig: everything a training run depends on, validated on construction and recorded in the run.

Defaults live here only; the CLI maps options one-to-one. Imports no torch (``arbs train --help`` is fast).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from .. import formats
from ..errors import ConfigError


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


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
    preset: str = "tiny"
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
    init: str | None = None  # float checkpoint to start from (E1TM formats only)
    # E1TM: final fraction of steps trained with the scales fused into E and frozen (only trits learn),
    # so the fused checkpoint is the trained one. None: 0.25 for flip, 0 for carry/average (nothing of
    # theirs would learn in it)
    fuse_phase: float | None = None
    device: str = "cpu"
    cuda_graph: bool = True  # --device cuda, carry/flip: capture each step in a CUDA graph (same integers, less Python)
    # float baselines (AdamW on latent float weights)
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup: int = 50
    baseline_threshold: float = 0.5  # learned-s/factorized: trits are 0 below this multiple of mean|W|
    threads: int | None = None

    def __post_init__(self):
        formats.check_format(self.format)
        if formats.is_e1tm(self.format):
            self.rule_params()
        elif self.rule is not None:
            raise ConfigError(f"--rule applies to E1TM formats only; {self.format!r} is a float baseline")
        elif self.init is not None:
            raise ConfigError("--init converts a float model into E1TM; use it with an E1TM --format")
        from ..models.config import get_preset

        get_preset(self.preset)  # raises with the list of presets
        for name in ("steps", "batch_size", "eval_every", "save_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.context is not None and self.context < 2:
            raise ConfigError(f"--context must be >= 2, got {self.context}")
        if self.keep is not None and self.keep < 1:
            raise ConfigError(f"--keep must be >= 1, got {self.keep}")
        if self.fuse_phase is not None and not 0.0 <= self.fuse_phase <= 1.0:
            raise ConfigError(f"--fuse-phase is a fraction of the steps, 0..1; got {self.fuse_phase}")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not _cuda_available():
            raise ConfigError("--device cuda: no CUDA GPU is visible to torch on this machine; use --device cpu")

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

    def lr_at(self, step: int) -> float:
        """Float baselines: AdamW's learning rate at ``step`` (linear warmup, cosine to 10%)."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        frac = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def run_meta(cfg: TrainConfig, corpus_info: dict) -> dict:
    """What a run records in every checkpoint's ``meta``: its identity (IDENTITY_KEYS) and its settings."""
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
    }
    if formats.is_e1tm(cfg.format):
        m["rule_params"] = cfg.rule_params()
    else:
        m.update(lr=cfg.lr, weight_decay=cfg.weight_decay, warmup=cfg.warmup, steps=cfg.steps,
                 baseline_threshold=cfg.baseline_threshold, gs=32)
    return m


IDENTITY_KEYS = ("format", "rule", "rule_params", "preset", "model", "seed", "batch_size", "data")
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
