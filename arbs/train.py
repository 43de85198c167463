"""``arbs train``: train the built-in byte GPT in E1TM form (integer-only state) or as a float baseline.

One config dataclass, one ``train(config)`` function that returns a TrainResult. Data order and every
random choice derive from (seed, step), so a resumed run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import data as data_mod
from . import formats as F
from . import nn as anx
from . import store
from .errors import ConfigError, NonFiniteError
from .model import GPT, PRESETS, GPTConfig, get_preset as preset

log = logging.getLogger(__name__)

FLOAT_FORMATS = ("fp32", "learned-s", "absmean", "absmean-row", "lsq", "factorized", "absmax-group")


def is_e1tm(fmt: str) -> bool:
    return fmt in F.VARIANTS


def check_format(fmt: str) -> None:
    if fmt not in F.VARIANTS and fmt not in FLOAT_FORMATS:
        valid = list(F.VARIANTS) + list(FLOAT_FORMATS)
        raise ConfigError(f"unknown format {fmt!r}; valid: {', '.join(valid)}.{F.did_you_mean(fmt, valid)}")


# arbs train's flip rule, measured in docs/training.md (the library's own defaults, formats.DEFAULT_PARAMS,
# are the plain rule): stochastic votes of up to 3 counter steps, theta 16, K 16; horizon = --steps.
FLIP_DEFAULTS = {"K": 16, "theta": 16, "gain": 4, "vote_max": 3}


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything a training run depends on. Defaults live here only; the CLI maps options one-to-one."""

    format: str = F.DEFAULT_VARIANT
    rule: str | None = None  # None: flip (from scratch and with --init: measured best in both, docs/training.md)
    # rule parameters; None: the defaults of FLIP_DEFAULTS / formats.DEFAULT_PARAMS (on --resume: the run's own)
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
    baseline_theta: float = 0.5  # threshold of learned-s/factorized, as a multiple of mean|W|
    threads: int | None = None

    def __post_init__(self):
        check_format(self.format)
        if is_e1tm(self.format):
            self.rule_params()
        elif self.rule is not None:
            raise ConfigError(f"--rule applies to E1TM formats only; {self.format!r} is a float baseline")
        elif self.init is not None:
            raise ConfigError("--init converts a float model into E1TM; use it with an E1TM --format")
        if self.preset not in PRESETS:
            preset(self.preset)  # raises with the list of presets
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
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA GPU is visible to torch on this machine; use --device cpu")

    @property
    def resolved_fuse_phase(self) -> float:
        if self.fuse_phase is not None:
            return self.fuse_phase
        return 0.25 if self.resolved_rule == "flip" else 0.0

    def given_rule_params(self) -> dict[str, int]:
        """The rule parameters set explicitly (not None)."""
        return {k: getattr(self, k) for k in F.DEFAULT_PARAMS if getattr(self, k) is not None}

    def rule_params(self) -> dict[str, int]:
        """The E1TM rule's integer parameters with arbs train's defaults (flip: FLIP_DEFAULTS, horizon --steps)."""
        rule = self.resolved_rule
        given = self.given_rule_params()
        if rule == "flip":
            given = FLIP_DEFAULTS | {"horizon": self.steps} | given
        unused = F.unused_params(rule, given)
        if unused:
            raise ConfigError(f"--{unused[0].replace('_', '-')} does not apply to rule {rule!r} (its parameters: "
                              f"{', '.join(F.rule_spec(rule).params) or 'none'})")
        return F.rule_params(rule, **given)

    @property
    def resolved_rule(self) -> str | None:
        if not is_e1tm(self.format):
            return None
        return self.rule or "flip"

    def model_config(self) -> GPTConfig:
        cfg = preset(self.preset)
        return dataclasses.replace(cfg, context=self.context) if self.context else cfg


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_train_loss: float
    val_loss: float  # nats/byte
    val_loss_fused: float | None  # E1TM: validation loss after fuse
    fuse_gap: float | None
    ms_per_step: float
    interrupted: bool = False
    history: list[dict] = field(default_factory=list)

    @property
    def val_bpb(self) -> float:
        return self.val_loss / math.log(2)


# -- model building (also used by eval/generate) ---------------------------------------------------------


def build(meta: dict, ckpt: store.Checkpoint | None = None, *, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """The model a run's meta describes, in training form, with ``ckpt``'s state loaded if given.

    Returns (model, handles) where handles holds 'clock' (E1TM) or 'optimizer' (float baselines).
    """
    cfg = GPTConfig(**meta["model"])
    torch.manual_seed(meta["seed"])
    model = GPT(cfg)
    fmt = meta["format"]
    handles: dict = {}
    if is_e1tm(fmt):
        if meta.get("init") and ckpt is None:
            _load_float_init(model, meta["init"])
        handles["clock"] = anx.ternarize_(model, fmt, meta["rule"], **meta.get("rule_params", {}), seed=meta["seed"])
        if ckpt is not None:
            anx.load_tensor_states(model, {n: t.arrays for n, t in ckpt.tensors.items()}, ckpt.step_counter)
        model.to(device)
    else:
        from . import baselines

        baselines.quantize_(model, fmt, gs=meta.get("gs", 32), theta=meta.get("baseline_theta", 0.5))
        model.to(device)
        groups = [{"params": baselines.latent_parameters(model), "weight_decay": meta["weight_decay"]},
                  {"params": baselines.quantizer_parameters(model), "weight_decay": 0.0}]
        handles["optimizer"] = torch.optim.AdamW([g for g in groups if g["params"]], lr=meta["lr"])
        if ckpt is not None:
            _load_float_state(model, handles["optimizer"], ckpt)
    return model, handles


def _load_float_init(model: torch.nn.Module, path: str) -> None:
    """Load a float model (an arbs fp32 run, a .safetensors file or a torch state dict) into ``model``."""
    p = Path(path)
    if p.is_dir():
        ck = store.open_checkpoint(p)
        if ck.kind != "float" or ck.meta.get("format") != "fp32":
            raise ConfigError(f"--init {path}: expected an fp32 float run, got {ck.kind} {ck.meta.get('format')!r}")
        sd = {n: torch.from_numpy(t.arrays["weight"]) for n, t in ck.tensors.items()}
    else:
        from .convert import load_float_state

        sd = {k: torch.from_numpy(np.asarray(v)) for k, v in load_float_state(p).items()}
    own = model.state_dict()
    bad = [f"{k}: {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in sd.items() if k in own and v.shape != own[k].shape]
    missing = sorted(set(own) - set(sd))
    if bad or missing:
        raise ConfigError(
            f"--init {path} does not fit the model: "
            + (f"shape mismatch {bad[:3]}" if bad else f"missing tensors {missing[:5]}")
            + " (use the same --preset/--context the float run used)"
        )
    model.load_state_dict({k: sd[k] for k in own})


def _float_tensors(model, optimizer) -> dict[str, store.TensorState]:
    out = {}
    for name, p in model.named_parameters():
        arrays = {"weight": p.detach().cpu().numpy().copy()}
        st = optimizer.state.get(p, {})
        for k, v in st.items():
            arrays[k] = v.detach().cpu().numpy().reshape(-1 if v.ndim == 0 else v.shape).copy()
        out[name] = store.TensorState(name=name, shape=tuple(p.shape), arrays=arrays)
    return out


def _load_float_state(model, optimizer, ckpt: store.Checkpoint) -> None:
    named = dict(model.named_parameters())
    if set(named) != set(ckpt.tensors):
        raise ConfigError(f"checkpoint {ckpt.path} does not match the model's parameters")
    with torch.no_grad():
        for name, p in named.items():
            t = ckpt.tensors[name]
            p.copy_(torch.from_numpy(t.arrays["weight"]))
            if "exp_avg" in t.arrays:
                optimizer.state[p] = {
                    "step": torch.tensor(float(t.arrays["step"].reshape(()))),
                    "exp_avg": torch.from_numpy(t.arrays["exp_avg"]).to(p.device),
                    "exp_avg_sq": torch.from_numpy(t.arrays["exp_avg_sq"]).to(p.device),
                }


def to_checkpoint(model, handles, meta: dict, step: int) -> store.Checkpoint:
    fmt = meta["format"]
    if is_e1tm(fmt):
        clock = handles["clock"]
        tensors = {n: store.TensorState(name=n, shape=s, arrays=a) for n, (s, a) in anx.tensor_states(model).items()}
        return store.Checkpoint(
            kind="e1tm", format=fmt, gs=F.variant_gs(fmt), rule=clock.scheme.rule,
            rule_params=dict(clock.scheme.params), fused=False, step_counter=step, tensors=tensors, meta=meta,
        )
    return store.Checkpoint(
        kind="float", format=None, gs=None, rule=None, rule_params={}, fused=False, step_counter=step,
        tensors=_float_tensors(model, handles["optimizer"]), meta=meta,
    )


# -- evaluation ------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, val: np.ndarray, *, batch_size: int, context: int, max_batches: int, device="cpu") -> float:
    """Mean validation loss in nats/byte over fixed, evenly spaced windows."""
    was = model.training
    model.eval()
    total, n = 0.0, 0
    for x, y in data_mod.eval_batches(val, batch_size=batch_size, context=context, max_batches=max_batches):
        with _autocast(device):
            _, loss = model(x.to(device), y.to(device))
        total += float(loss) * x.numel()
        n += x.numel()
    model.train(was)
    return total / max(n, 1)


def _autocast(device):
    if device == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    import contextlib

    return contextlib.nullcontext()


def fused_model(ckpt: store.Checkpoint, device="cpu") -> torch.nn.Module:
    """A float GPT whose weights are the fused (rounded-scale) W_eff of an E1TM checkpoint (ephemeral)."""
    from .fuse import fused_weights, fuse_checkpoint

    fck = ckpt if ckpt.fused else fuse_checkpoint(ckpt)[0]
    model = GPT(GPTConfig(**ckpt.meta["model"]))
    weights = fused_weights(fck)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    return model.to(device)


# -- the loop --------------------------------------------------------------------------------------------


def _lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def _meta(cfg: TrainConfig, corpus_info: dict) -> dict:
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
    if is_e1tm(cfg.format):
        m["rule_params"] = cfg.rule_params()
    else:
        m.update(lr=cfg.lr, weight_decay=cfg.weight_decay, warmup=cfg.warmup, steps=cfg.steps,
                 baseline_theta=cfg.baseline_theta, gs=32)
    return m


_IDENTITY_KEYS = ("format", "rule", "rule_params", "preset", "model", "seed", "batch_size", "data")
# Rule parameters a resume may change: a schedule, not the model (--resume --steps N --horizon N extends a run).
RESUME_MAY_CHANGE = ("horizon",)


def _check_resume(ck: store.Checkpoint, meta: dict, run_dir: Path) -> None:
    for k in _IDENTITY_KEYS:
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


def train(cfg: TrainConfig, *, on_step: Callable[[dict], None] | None = None, on_eval=None) -> TrainResult:
    """Train per ``cfg``; checkpoints, metrics.jsonl and loss.png go to ``cfg.out``.

    ``on_step(record)`` is called after every step (for a progress bar); ``on_eval(record)`` after every
    evaluation. Ctrl-C finishes the current step, saves a checkpoint and returns with interrupted=True.
    A NaN/inf loss raises NonFiniteError without saving: the last good checkpoint stays as it was.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(cfg.out)
    corpus = data_mod.load_corpus(cfg.data) if cfg.data else data_mod.default_corpus()
    mcfg = cfg.model_config()
    for part, arr in (("training", corpus.train), ("validation", corpus.val)):
        if len(arr) < mcfg.context + 1:
            raise ConfigError(
                f"the {part} split has {len(arr)} bytes, fewer than --context {mcfg.context} + 1; "
                "use more data or a smaller --context"
            )
    meta = _meta(cfg, corpus.info)
    ckpt = None
    if cfg.resume:
        ckpt = store.open_checkpoint(run_dir)
        if ckpt.rule is not None and ckpt.rule == meta.get("rule"):  # parameters not given are the run's own
            meta["rule_params"] = dict(ckpt.rule_params) | cfg.given_rule_params()
        _check_resume(ckpt, meta, run_dir)
        # the run's identity, but the rule_params asked for (equal to the run's but for RESUME_MAY_CHANGE)
        meta = ckpt.meta | {k: v for k, v in meta.items() if k not in _IDENTITY_KEYS or k == "rule_params"}
    elif store.list_checkpoints(run_dir) if run_dir.exists() else False:
        raise ConfigError(f"{run_dir} already holds checkpoints; pass --resume to continue it or choose another --out")
    model, handles = build(meta, ckpt, device=cfg.device)
    step = ckpt.step_counter if ckpt is not None else 0
    if ckpt is None:
        store.save_checkpoint(run_dir, to_checkpoint(model, handles, meta, 0), keep=cfg.keep)
    opt = handles.get("optimizer")
    clock = handles.get("clock")
    fuse_from = cfg.steps - round(cfg.resolved_fuse_phase * cfg.steps)
    if clock is not None and step < cfg.steps and "flip_accum" in clock.scheme.arrays():
        sp = clock.scheme.params
        if sp["gain"] and F.trit_vote_gain(sp, step) == 0:  # as in ops.vote: past the horizon no trit votes
            log.warning("the run's vote schedule ended at step %d (--horizon): its trits are final and only its "
                        "scales train until the fuse phase; pass --horizon N (> %d) to go on training the trits",
                        sp["horizon"], step)
    model.train()
    use_graph = cfg.cuda_graph and clock is not None and cfg.device == "cuda" and anx.graphable(model)
    graphed = None

    stop = {"flag": False}
    old_handler = signal.getsignal(signal.SIGINT)

    def _on_sigint(signum, frame):
        if stop["flag"]:  # a second Ctrl-C: stop now
            signal.signal(signal.SIGINT, old_handler)
            raise KeyboardInterrupt
        stop["flag"] = True
        log.warning("interrupt: finishing this step and saving a checkpoint (Ctrl-C again to abort)")

    in_main = _is_main_thread()
    if in_main:
        signal.signal(signal.SIGINT, _on_sigint)
    history, last_loss, t_steps, n_timed = [], float("nan"), 0.0, 0
    val_loss = None
    try:
        while step < cfg.steps and not stop["flag"]:
            x, y = data_mod.get_batch(corpus.train, batch_size=cfg.batch_size, context=mcfg.context, seed=cfg.seed, step=step)
            x, y = x.to(cfg.device), y.to(cfg.device)
            t0 = time.perf_counter()
            if opt is not None:
                for g in opt.param_groups:
                    g["lr"] = _lr_at(cfg, step)
            elif step >= fuse_from and not clock.freeze_scale:  # idempotent, so a resumed run does the same
                st = anx.fuse_scales_(model)
                log.info("fuse phase from step %d: scales fused into E (%d of %d groups changed, %d clipped)",
                         step, st["changed"], st["groups"], st["clipped"])
            if use_graph:  # forward + backward + votes replayed from one CUDA graph; a NaN raises in step
                if graphed is None:
                    graphed = anx.GraphedStep(model, lambda a, b: model(a, b)[1], x, y)
                lv = _finite_loss(graphed(x, y).item(), step, run_dir)
            else:
                with _autocast(cfg.device):
                    _, loss = model(x, y)
                lv = _finite_loss(loss.item(), step, run_dir)
                loss.backward()
                if opt is not None:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                else:
                    anx.step(model)
            step += 1
            dt = time.perf_counter() - t0
            if step > 1:  # the first step compiles kernels
                t_steps += dt
                n_timed += 1
            last_loss = lv
            rec = {"step": step, "train_loss": lv, "ms_per_step": dt * 1e3,
                   "tokens_per_s": x.numel() / dt if dt > 0 else None}
            if "clock" in handles:
                rec.update(handles["clock"].stats)
            if on_step:
                on_step(rec)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                val_loss = evaluate(model, corpus.val, batch_size=cfg.batch_size, context=mcfg.context,
                                    max_batches=cfg.eval_batches, device=cfg.device)
                rec = rec | {"val_loss": val_loss, "val_bpb": val_loss / math.log(2)}
                store.append_metrics(run_dir, rec)
                history.append(rec)
                if on_eval:
                    on_eval(rec)
            if step % cfg.save_every == 0 or step == cfg.steps or stop["flag"]:
                store.save_checkpoint(run_dir, to_checkpoint(model, handles, meta, step), keep=cfg.keep)
    finally:
        if in_main:
            signal.signal(signal.SIGINT, old_handler)
    if stop["flag"] and not store.resolve_checkpoint(run_dir).name == f"step_{step}":
        store.save_checkpoint(run_dir, to_checkpoint(model, handles, meta, step), keep=cfg.keep)
    if val_loss is None:
        val_loss = evaluate(model, corpus.val, batch_size=cfg.batch_size, context=mcfg.context,
                            max_batches=cfg.eval_batches, device=cfg.device)
    fused_loss = gap = None
    if is_e1tm(cfg.format):
        final = store.open_checkpoint(run_dir)
        fm = fused_model(final, device=cfg.device)
        fused_loss = evaluate(fm, corpus.val, batch_size=cfg.batch_size, context=mcfg.context,
                              max_batches=cfg.eval_batches, device=cfg.device)
        gap = fused_loss - val_loss
        store.append_metrics(run_dir, {"step": step, "val_loss_fused": fused_loss, "fuse_gap": gap})
    from .plots import plot_run

    plot_run(run_dir)
    return TrainResult(
        run_dir=run_dir, steps=step, final_train_loss=last_loss, val_loss=val_loss, val_loss_fused=fused_loss,
        fuse_gap=gap, ms_per_step=(t_steps / n_timed * 1e3) if n_timed else float("nan"),
        interrupted=stop["flag"], history=history,
    )


def _finite_loss(lv: float, step: int, run_dir: Path) -> float:
    if not math.isfinite(lv):
        raise NonFiniteError(
            f"training loss became {lv} at step {step}; stopped without saving. "
            f"The last good checkpoint in {run_dir} is unchanged."
        )
    return lv


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
